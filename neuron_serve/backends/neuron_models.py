"""Where a compiled Neuron model comes from, exactly as neuronx-tgi finds one.

- An already compiled model: a local directory (`/data/<model>`) or a hub repository holding a
  `neuron_config.json` — loaded as it is.
- A standard model: compiled at start for `HF_BATCH_SIZE` x `HF_SEQUENCE_LENGTH` on `HF_NUM_CORES`
  cores in `HF_AUTO_CAST_TYPE` (falling back to our own settings, and to bfloat16). The Neuron model
  cache on the hub is looked up first: when no batch size was asked for, the smallest cached one is
  taken (`pin_cached_batch`, once for the whole app, so that the ingress and Serve size themselves by
  it too); the compiler runs only on a miss. The result is saved under the cache directory (`/data`
  in the container), so the next start loads it directly. One replica of a node compiles; the others
  wait for it, then load what it saved.

Reading a `neuron_config.json` needs no Neuron library: the HTTP ingress and the limits use these
functions on any host. Loading and compiling take the model class (optimum-neuron's, or a stand-in).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..config import Config
from ..errors import ConfigError
from ..model_files import on_the_hub, read_neuron_config
from ..tiny_model import default_cache_dir

logger = logging.getLogger(__name__)

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "bfloat16": "bfloat16", "float16": "float16",
          "float32": "float32"}


@dataclass(frozen=True)
class CompiledShape:
    """What a compiled model fixes, read from its neuron_config.json (or what an export will fix)."""

    batch_size: int
    sequence_length: int
    max_context_length: int
    tp_degree: int
    dtype: str
    continuous_batching: bool
    on_device_sampling: bool

    @classmethod
    def from_neuron_config(cls, nc: dict[str, Any]) -> CompiledShape:
        return cls(
            batch_size=int(nc["batch_size"]),
            sequence_length=int(nc["sequence_length"]),
            max_context_length=int(nc.get("max_context_length") or nc["sequence_length"]),
            tp_degree=int(nc["tp_degree"]),
            dtype=str(nc.get("torch_dtype", "bfloat16")).removeprefix("torch."),
            continuous_batching=bool(nc.get("continuous_batching", False)),
            on_device_sampling=bool(nc.get("on_device_sampling", False)),
        )


@dataclass(frozen=True)
class ExportPlan:
    """A standard model to compile: the neuronx-tgi export settings, settled."""

    model_id: str
    batch_size: int
    sequence_length: int
    num_cores: int
    dtype: str

    def cache_key(self) -> str:
        return f"b{self.batch_size}-s{self.sequence_length}-tp{self.num_cores}-{self.dtype}"


def export_plan(config: Config, model_dir: Path) -> ExportPlan:
    """neuronx-tgi's export settings (HF_*), else ours, else the model's own positions and bfloat16."""
    model_config = json.loads((Path(model_dir) / "config.json").read_text())
    max_positions = model_config.get("max_position_embeddings") or 4096
    if config.export_auto_cast_type:
        dtype = DTYPES[config.export_auto_cast_type]
    elif config.dtype != "auto":
        dtype = config.dtype
    else:
        dtype = "bfloat16"
    return ExportPlan(
        model_id=config.model_id,
        batch_size=config.export_batch_size or config.max_batch_size or 1,
        sequence_length=config.export_sequence_length or config.max_total_tokens or min(4096, max_positions),
        num_cores=config.export_num_cores or config.cores_per_replica,
        dtype=dtype,
    )


def compiled_shape(config: Config, model_dir: Path) -> CompiledShape:
    """The shape the replica will run: the compiled model's, or the one its export will have."""
    nc = read_neuron_config(model_dir)
    if nc is not None:
        return CompiledShape.from_neuron_config(nc)
    plan = export_plan(config, model_dir)
    return CompiledShape(plan.batch_size, plan.sequence_length, plan.sequence_length, plan.num_cores, plan.dtype,
                         continuous_batching=plan.batch_size > 1, on_device_sampling=False)


def check_against_settings(config: Config, shape: CompiledShape) -> None:
    """neuronx-tgi's rules beyond the token limits: the cores and dtype must be the compiled ones."""
    if config.cores_per_replica != shape.tp_degree:
        raise ConfigError(
            f"`cores_per_replica` ({config.cores_per_replica}) must be equal to the compiled model's tp_degree "
            f"({shape.tp_degree}): each replica asks Ray for exactly the cores the model was compiled for"
        )
    for variable, asked, dimension, compiled in (
        ("HF_NUM_CORES", config.export_num_cores, "tp_degree", shape.tp_degree),
        ("HF_BATCH_SIZE", config.export_batch_size, "batch_size", shape.batch_size),
        ("HF_SEQUENCE_LENGTH", config.export_sequence_length, "sequence_length", shape.sequence_length),
    ):
        if asked is not None and asked != compiled:
            raise ConfigError(f"{variable} ({asked}) must be equal to the compiled model's {dimension} ({compiled})")
    if config.export_auto_cast_type and DTYPES[config.export_auto_cast_type] != shape.dtype:
        raise ConfigError(
            f"HF_AUTO_CAST_TYPE ({config.export_auto_cast_type}) must match the compiled model's dtype ({shape.dtype})"
        )


def batch_is_fixed(config: Config) -> bool:
    """A batch size asked for is kept: MAX_BATCH_SIZE, or HF_BATCH_SIZE, which the ingress sizes itself by."""
    return config.max_batch_size is not None or config.export_batch_size is not None


def choose_cached_entry(entries: list[dict[str, Any]], plan: ExportPlan, batch_is_fixed: bool) -> dict[str, Any] | None:
    """A hub-cache entry to use: same sequence length, cores and dtype; the exact batch size first,
    else (when the batch size was not pinned) the smallest larger one; None means compile."""
    same = [
        e for e in entries
        if e.get("sequence_length") == plan.sequence_length
        and e.get("tp_degree") == plan.num_cores
        and DTYPES.get(str(e.get("torch_dtype", "")).removeprefix("torch."), "") == plan.dtype
    ]
    exact = [e for e in same if e.get("batch_size") == plan.batch_size]
    if exact:
        return exact[0]
    larger = sorted((e for e in same if e.get("batch_size", 0) > plan.batch_size), key=lambda e: e["batch_size"])
    return larger[0] if larger and not batch_is_fixed else None


def hub_cache_entries(plan: ExportPlan, token: str | None) -> list[dict[str, Any]]:
    """The Neuron model cache's compiled configurations for this model and an inf2 (or trn1) host, whose
    compilation target is trn1; empty when the cache is unreachable."""
    try:
        from optimum.neuron.cache.hub_cache import get_hub_cached_entries

        entries = get_hub_cached_entries(plan.model_id, task="text-generation")
    except Exception as e:  # offline, gated without token, no registry: compile instead
        logger.warning("Neuron model cache lookup for %s failed (%s: %s): compiling", plan.model_id, type(e).__name__, e)
        return []
    return [e for e in entries if e.get("target", "trn1") == "trn1"]


def pin_cached_batch(
    config: Config,
    model_dir: Path,
    lookup: Callable[[ExportPlan, str | None], list[dict[str, Any]]] = hub_cache_entries,
) -> Config:
    """`config` with `export_batch_size` (HF_BATCH_SIZE) pinned to a cached batch size, when a standard hub
    model is to be compiled and no batch size was asked for: the smallest one the Neuron model cache holds
    for its other settings. Done once, where the app is built, so that every process (the ingress, Serve's
    `max_ongoing_requests`, each batcher) sizes itself by the batch the batchers will load."""
    if read_neuron_config(model_dir) is not None or batch_is_fixed(config) or not on_the_hub(config.model_id):
        return config
    plan = export_plan(config, model_dir)
    token = config.token
    entry = choose_cached_entry(lookup(plan, token), plan, batch_is_fixed=False)
    if entry is None:
        return config
    logger.info("using the Neuron model cache's batch size %d for %s (none was asked for) to avoid compiling",
                entry["batch_size"], plan.model_id)
    return config.model_copy(update={"export_batch_size": int(entry["batch_size"])})


def cache_root(config: Config) -> Path:
    return Path(config.cache_dir) if config.cache_dir else default_cache_dir()


def runtime_visible_cores(cores: str) -> str:
    """NEURON_RT_VISIBLE_CORES in the form optimum-neuron counts: Ray writes the cores it gave as a list
    ("2,3"), which optimum-neuron's `get_available_cores` takes for one core, and then refuses to load
    a model compiled for two; the Neuron runtime takes the same cores as a range ("2-3")."""
    if "," not in cores:  # one core, or already a range
        return cores
    ids = sorted(int(c) for c in cores.split(",") if c.strip())
    if ids != list(range(ids[0], ids[-1] + 1)):
        raise ConfigError(f"NEURON_RT_VISIBLE_CORES={cores}: the cores of a replica must be contiguous "
                          "(optimum-neuron reads the variable as one core or a range)")
    return f"{ids[0]}-{ids[-1]}"


def load_neuron_model(
    config: Config,
    model_dir: Path,
    model_class,
    lookup: Callable[[ExportPlan, str | None], list[dict[str, Any]]] = hub_cache_entries,
):
    """The loaded model: compiled as given, from our compiled cache, or exported now (and cached)."""
    visible = os.environ.get("NEURON_RT_VISIBLE_CORES")
    if visible:  # set by Ray for this replica's process, read by the Neuron runtime and by optimum-neuron
        os.environ["NEURON_RT_VISIBLE_CORES"] = runtime_visible_cores(visible)
    token = config.token
    if read_neuron_config(model_dir) is not None:
        logger.info("loading compiled model %s from %s", config.model_id, model_dir)
        return model_class.from_pretrained(str(model_dir), token=token)

    lookup = _asked_once(lookup)  # pinning and compiling below ask about the same model
    config = pin_cached_batch(config, model_dir, lookup)  # pinned already when the app was built
    plan = export_plan(config, model_dir)
    target = cache_root(config) / "compiled" / plan.model_id.replace("/", "--") / (config.revision or "main") / plan.cache_key()
    with _held_by_one_process(target):  # the node's other replicas wait here for the first one's compilation
        if read_neuron_config(target) is None:
            hub_source = on_the_hub(config.model_id)  # the hub cache knows hub models only
            cached = hub_source and choose_cached_entry(lookup(plan, token), plan, batch_is_fixed=True) is not None
            logger.warning(
                "compiling %s for batch %d x %d tokens on %d cores (%s)%s; this can take a long time",
                plan.model_id, plan.batch_size, plan.sequence_length, plan.num_cores, plan.dtype,
                ", with the hub cache's artifacts" if cached else ", not found in the Neuron model cache",
            )
            model = export_model(model_class, plan, source=plan.model_id if hub_source else str(model_dir),
                                 token=token, revision=config.revision)
            _save_whole(model, target)
            logger.info("saved the compiled model to %s", target)
            return model
    logger.info("loading %s compiled earlier from %s", plan.model_id, target)
    # Saved without its weights when exported from the hub: loading fetches them, gated ones with the token.
    return model_class.from_pretrained(str(target), token=token)


def _asked_once(lookup: Callable[[ExportPlan, str | None], list[dict[str, Any]]]):
    """`lookup` asking the hub once per model: its answer is every cached configuration of the model."""
    answers: dict[str, list[dict[str, Any]]] = {}

    def ask(plan: ExportPlan, token: str | None) -> list[dict[str, Any]]:
        if plan.model_id not in answers:
            answers[plan.model_id] = lookup(plan, token)
        return answers[plan.model_id]

    return ask


@contextlib.contextmanager
def _held_by_one_process(target: Path):
    """An exclusive lock on `target` (a file beside it) for the time of the block."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _save_whole(model, target: Path) -> None:
    """Saves into a folder beside `target`, then renames it: a process that finds `target` finds all of it."""
    partial = target.parent / f"{target.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(str(partial))
    shutil.rmtree(target, ignore_errors=True)  # a folder left by a save that did not finish, before this one
    os.replace(partial, target)


def export_model(model_class, plan: ExportPlan, source: str | None = None, token: str | None = None,
                 revision: str | None = None):
    """Compile a standard model (hub id or local directory `source`) through optimum-neuron's export."""
    import torch

    source = source or plan.model_id
    neuron_config = model_class.get_neuron_config(
        source, token=token, revision=revision, batch_size=plan.batch_size,
        sequence_length=plan.sequence_length, tensor_parallel_size=plan.num_cores,
    )
    neuron_config.torch_dtype = getattr(torch, plan.dtype)
    return model_class.export(source, neuron_config=neuron_config, token=token, revision=revision, load_weights=True)
