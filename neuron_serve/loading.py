"""From a `Config` to a ready `Engine`: find the model, load its tokenizer, open the backend, settle limits.

Each backend has an `open_*` function returning the backend and the limits it runs with; the Neuron
one imports Neuron libraries only when chosen. `model_limits` gives the same limits from
configuration files alone, for the HTTP ingress, which never loads weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .backends import Backend
from .config import Config, Limits, resolve_limits
from .engine import Engine
from .errors import ConfigError
from .model_files import eos_token_ids, load_tokenizer, read_neuron_config, resolve_model_dir
from .scheduler import InsertionPolicy, PrefillPolicy

logger = logging.getLogger(__name__)


def _max_positions(model_dir: Path) -> int:
    model_config = json.loads((Path(model_dir) / "config.json").read_text())
    return int(model_config.get("max_position_embeddings") or model_config.get("n_positions") or 4096)


def model_limits(config: Config, model_dir) -> Limits:
    """The limits a deployment runs with, from the model's configuration files alone (no weights).

    The HTTP ingress validates with these, and each batcher's engine runs with the same.
    """
    if config.backend == "neuron":
        from .backends.neuron_models import compiled_shape

        shape = compiled_shape(config, model_dir)
        return resolve_limits(config, max_positions=shape.sequence_length, compiled_batch_size=shape.batch_size,
                              compiled_sequence_length=shape.sequence_length)
    return resolve_limits(config, max_positions=_max_positions(model_dir))


def settle_cores(config: Config, model_dir) -> Config:
    """`cores_per_replica` where it was not set, as neuronx-tgi sizes itself: the cores a compiled model was
    compiled for, else HF_NUM_CORES, else the default."""
    if "cores_per_replica" in config.model_fields_set:
        return config
    compiled = read_neuron_config(Path(model_dir))
    cores = int(compiled["tp_degree"]) if compiled else config.export_num_cores
    return config.model_copy(update={"cores_per_replica": cores}) if cores else config


def settle_config(config: Config, model_dir) -> Config:
    """What every process of an app runs with, decided once where the app is built: for a Neuron model
    still to be compiled with no batch size asked for, the Neuron model cache's batch size."""
    if config.backend != "neuron":
        return config
    from .backends.neuron_models import pin_cached_batch

    return pin_cached_batch(config, Path(model_dir))


def open_torch_backend(config: Config, model_dir) -> tuple[Backend, Limits]:
    from .backends.torch_llama import TorchBackend, load_config

    model_config = load_config(model_dir)
    limits = model_limits(config, model_dir)
    dtype = config.dtype
    if dtype == "auto":
        dtype = "float32" if config.device == "cpu" else str(getattr(model_config, "torch_dtype", "bfloat16")).removeprefix("torch.")
    backend = TorchBackend(model_dir, limits.max_batch_size, limits.max_total_tokens, dtype=dtype, device=config.device)
    return backend, limits


def open_neuron_backend(config: Config, model_dir, model_class=None) -> tuple[Backend, Limits]:
    """optimum-neuron's compiled model as a backend; `model_class` is optimum-neuron's unless given."""
    from .backends.neuron import NeuronBackend, neuron_model_class
    from .backends.neuron_models import (
        CompiledShape, check_against_settings, compiled_shape, load_neuron_model,
    )

    if model_class is None:
        try:
            model_class = neuron_model_class()
        except ImportError as e:
            raise ConfigError(str(e)) from None
    # The compiled model's neuron_config.json, or the export's plan, which the export then compiles: checked
    # before a load, or a compilation, of minutes.
    check_against_settings(config, compiled_shape(config, Path(model_dir)))
    model = load_neuron_model(config, Path(model_dir), model_class)
    nc = model.neuron_config
    shape = CompiledShape(nc.batch_size, nc.sequence_length, nc.max_context_length or nc.sequence_length, nc.tp_degree,
                          str(nc.torch_dtype).removeprefix("torch."), bool(nc.continuous_batching), bool(nc.on_device_sampling))
    if shape.on_device_sampling:  # optimum-neuron's default for Llama: the device picks each token
        logger.warning("%s samples on the device, as in neuronx-tgi: top_k (up to %d), top_p and temperature apply; "
                       "repetition_penalty, frequency_penalty, typical_p and seed do not, and logprobs are 0",
                       config.model_id, getattr(nc, "max_topk", 256))
    limits = resolve_limits(config, max_positions=shape.sequence_length, compiled_batch_size=shape.batch_size,
                            compiled_sequence_length=shape.sequence_length)
    if limits.max_input_tokens > shape.max_context_length:
        raise ConfigError(f"`max_input_tokens` ({limits.max_input_tokens}) must be <= the compiled model's "
                          f"max_context_length ({shape.max_context_length})")
    model_config = json.loads((Path(model_dir) / "config.json").read_text())
    # A multimodal config (Llama 4) keeps it in its text config, which is what optimum-neuron compiles.
    vocab_size = model_config.get("vocab_size") or model_config.get("text_config", {}).get("vocab_size")
    if vocab_size is None or read_neuron_config(model_dir) is None:  # exported now: the model's own config
        vocab_size = model.config.vocab_size
    return NeuronBackend(model, vocab_size=vocab_size), limits


def insertion_policy(config: Config, backend: Backend) -> InsertionPolicy:
    """`auto` picks what the backend can do (the engine refuses an explicit policy it cannot run)."""
    if config.insertion == "auto":
        return InsertionPolicy("insert" if backend.prefills_subset else "rebuild")
    return InsertionPolicy(config.insertion)


def open_simulated_backend(config: Config, model_dir) -> tuple[Backend, Limits]:
    from .backends.simulated import Inf2Timing, SimulatedBackend, count_parameters

    limits = model_limits(config, model_dir)
    tokenizer = load_tokenizer(model_dir, config.token)
    timing = Inf2Timing(params=config.simulated_params or count_parameters(model_dir), cores=max(1, config.cores_per_replica))
    avoid = set(tokenizer.all_special_ids) | eos_token_ids(model_dir, tokenizer)
    backend = SimulatedBackend(limits.max_batch_size, limits.max_total_tokens, len(tokenizer), timing, avoid_ids=avoid)
    return backend, limits


def open_backend(config: Config, model_dir) -> tuple[Backend, Limits]:
    opener = {"neuron": open_neuron_backend, "simulated": open_simulated_backend}.get(config.backend, open_torch_backend)
    return opener(config, model_dir)


def build_engine(config: Config, backend: Backend | None = None, limits: Limits | None = None) -> Engine:
    """The engine for `config`; a backend already opened (tests, benchmarks) may be given with its limits."""
    model_dir = resolve_model_dir(config)
    tokenizer = load_tokenizer(model_dir, config.token)
    if backend is None:
        backend, limits = open_backend(config, model_dir)
    if config.fault_injection:
        from .backends.faults import FaultInjectingBackend

        backend = FaultInjectingBackend(backend)
    policy = insertion_policy(config, backend)
    engine = Engine(
        backend,
        tokenizer,
        limits,
        eos_token_ids(model_dir, tokenizer),
        insertion=policy,
        prefill_policy=PrefillPolicy(config.waiting_served_ratio, config.max_waiting_tokens),
    )
    logger.info("engine ready: %s on %s, %s, insertion=%s", config.model_id, backend.description, limits, policy.name)
    return engine
