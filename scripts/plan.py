#!/usr/bin/env python
"""Capacity planner: the NeuronCore group, batch size and replica count for a model on an instance type.

    python scripts/plan.py --model meta-llama/Meta-Llama-3-8B --instance inf2.48xlarge \
        [--sequence-length 4096] [--batch-size N] [--dtype bf16] [--json] [--out-dir DIR]

`--model` is a hub id (its config.json is fetched with HF_TOKEN) or a local config.json or model
directory. The planner counts parameters from the config and sizes, per NeuronCore:

    weights/core = params(heads as sharded) x dtype bytes / tp           (norms, replicated, are added whole)
    KV/core      = 2 x layers x (kv heads as sharded / tp) x head_dim x sequence_length x batch x dtype bytes
    fits         = weights/core + KV/core <= 16 GiB HBM - 2 GiB headroom

The headroom is what the Neuron runtime takes besides tensors (compiled graphs, scratchpad, DMA
rings, collectives buffers), the reserve that vLLM-on-Neuron also keeps per core.

Tensor-parallel degrees (tp) tried: 1, 2, 4, 6, 8, 12, 16, 24, 32, those that divide the instance's cores
(so groups tile it: replicas = cores / tp). Heads are sharded the way optimum-neuron does it
(`get_shardable_head_counts`): query heads padded to a multiple of tp; KV heads split when tp divides
them, replicated to tp when they divide tp, else converted to one per query head. A tp is *exact* when
it divides the query heads and the KV heads split or replicate evenly (nothing padded); the plan is
the smallest exact tp that fits, and a padded one only when no exact one does (e.g. 70B on 12 cores).
Batch: the given one is checked; otherwise the largest that fits, at most 128.

Prints the table it reasoned with, writes serve_config.yaml and rayservice.yaml into --out-dir, and
with --json prints one JSON object as its last line. Exits 2 when the model cannot fit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from neuron_serve.config import DEFAULT_MAX_TOTAL_TOKENS
from neuron_serve.instances import INSTANCE_TYPES, InstanceType, lookup
from render_kuberay import (
    DEFAULT_IMAGE,
    DEFAULT_MAX_WORKERS,
    DEFAULT_MIN_WORKERS,
    SERVE_CONFIG,
    manifest_text,
    render_rayservice,
)

GIB = 2**30
HEADROOM_GIB_PER_CORE = 2.0
TP_DEGREES = (1, 2, 4, 6, 8, 12, 16, 24, 32)
# A static batch is computed whole at every step, and prefill time grows with it; past ~128 rows decode
# also nears the compute-bound point (Inferentia2: ~190 TFLOPS over 820 GB/s per device, ~230 rows).
MAX_BATCH_SIZE = 128
DTYPE_BYTES = {"bf16": 2, "fp16": 2}
# model_type values optimum-neuron 0.4.5 can export for text generation
NEURON_MODEL_TYPES = frozenset({"granite", "llama", "llama4_text", "mixtral", "phi3", "qwen2", "qwen3", "qwen3_moe", "smollm3"})


class PlanError(Exception):
    """The model cannot be planned on this instance; the message says why and what would work."""


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on, read from a Hugging Face config.json."""

    name: str
    model_type: str
    hidden_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int  # of one MLP (one expert for MoE models)
    experts: int  # 0 for a dense MLP
    vocab_size: int
    tied_embeddings: bool
    attention_bias: bool
    max_positions: int
    moe_every: int = 1  # every n-th layer is MoE, the others dense (Llama 4's interleave_moe_layer_step)
    dense_intermediate_size: int = 0  # the MLP of a dense layer in a MoE model (Llama 4's intermediate_size_mlp)
    shared_expert: bool = False  # a MoE layer also runs one expert for every token (Llama 4)

    @classmethod
    def from_config(cls, config: dict[str, Any], name: str) -> ModelShape:
        if "num_hidden_layers" not in config and isinstance(config.get("text_config"), dict):
            config = {"model_type": config.get("model_type"), **config["text_config"]}  # a multimodal model's LM
        try:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            experts = int(config.get("num_local_experts") or config.get("num_experts") or 0)
            expert_size = config.get("moe_intermediate_size") if experts else None
            return cls(
                name=name,
                model_type=str(config.get("model_type", "unknown")),
                hidden_size=hidden,
                layers=int(config["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                intermediate_size=int(expert_size or config["intermediate_size"]),
                experts=experts,
                moe_every=int(config.get("interleave_moe_layer_step") or 1) if experts else 1,
                dense_intermediate_size=int(config.get("intermediate_size_mlp") or 0),
                shared_expert=experts > 0 and str(config.get("model_type", "")).startswith("llama4"),
                vocab_size=int(config["vocab_size"]),
                tied_embeddings=bool(config.get("tie_word_embeddings", False)),
                attention_bias=bool(config.get("attention_bias", False)),
                max_positions=int(config.get("max_position_embeddings") or DEFAULT_MAX_TOTAL_TOKENS),
            )
        except KeyError as e:
            raise PlanError(f"{name}: config.json has no {e.args[0]!r}; is it a decoder-only text model?") from None

    def parameters(self, heads: int | None = None, kv_heads: int | None = None) -> int:
        """Parameter count, with the attention heads as sharded (padded or replicated) when given."""
        h, d = self.hidden_size, self.head_dim
        q, kv = (heads or self.heads) * d, (kv_heads or self.kv_heads) * d
        attention = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.attention_bias else 0)
        gated_mlp = 3 * h * self.intermediate_size
        if not self.experts:
            mlps = self.layers * gated_mlp
        else:  # experts, the router, the shared expert; the layers in between are dense
            moe_layers = self.layers // self.moe_every
            moe = (self.experts + self.shared_expert) * gated_mlp + h * self.experts
            dense = 3 * h * (self.dense_intermediate_size or self.intermediate_size)
            mlps = moe_layers * moe + (self.layers - moe_layers) * dense
        embeddings = self.vocab_size * h * (1 if self.tied_embeddings else 2)  # input + lm_head
        return embeddings + self.layers * attention + mlps + self.norm_parameters()

    def norm_parameters(self) -> int:
        return (2 * self.layers + 1) * self.hidden_size


def read_model_config(model: str, token: str | None) -> tuple[dict[str, Any], str]:
    """(config.json as a dict, the model_id to serve): a local file or directory, else a hub id."""
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return json.loads(path.read_text()), str(path.parent)
    if model.endswith(".json") or path.is_absolute() or model.startswith("."):
        raise PlanError(f"--model: {model} is not a config.json or a directory holding one")
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(model, "config.json", token=token)).read_text()), model
    except Exception as e:
        raise PlanError(f"--model: cannot read config.json of {model} from the hub ({type(e).__name__}: {e}); "
                        "set HF_TOKEN for a gated model, or pass a local config.json") from None


@dataclass(frozen=True)
class Sharding:
    tp: int
    heads: int  # query heads after padding to a multiple of tp
    kv_heads: int  # KV heads after replication or conversion
    kind: str  # split | replicated | padded

    @property
    def exact(self) -> bool:
        return self.kind != "padded"


def shard_heads(tp: int, heads: int, kv_heads: int) -> Sharding:
    """Head counts as optimum-neuron 0.4.5 shards them over `tp` cores (`gqa.get_shardable_head_counts`)."""
    padded = heads + (-heads) % tp
    if kv_heads == heads:  # multi-head attention: KV heads follow the query heads
        return Sharding(tp, padded, padded, "split" if padded == heads else "padded")
    if kv_heads % tp == 0:
        sharded_kv, kind = kv_heads, "split"
    elif tp % kv_heads == 0:
        sharded_kv, kind = tp, "replicated"
    else:
        sharded_kv, kind = padded, "padded"
    return Sharding(tp, padded, sharded_kv, kind if padded == heads else "padded")


@dataclass(frozen=True)
class Candidate:
    """One core-group size, with its memory per core."""

    sharding: Sharding
    weights_per_core: int  # bytes
    kv_per_sequence_per_core: int  # bytes, one sequence of the planned length
    budget_per_core: int  # bytes usable for weights + KV
    replicas: int  # groups on one instance

    @property
    def tp(self) -> int:
        return self.sharding.tp

    def memory_per_core(self, batch: int) -> int:
        return self.weights_per_core + batch * self.kv_per_sequence_per_core

    @property
    def max_batch(self) -> int:
        return max(0, (self.budget_per_core - self.weights_per_core) // self.kv_per_sequence_per_core)


def candidates(shape: ModelShape, instance: InstanceType, sequence_length: int, dtype_bytes: int) -> list[Candidate]:
    budget = int((instance.hbm_gib_per_core - HEADROOM_GIB_PER_CORE) * GIB)
    out = []
    for tp in (t for t in TP_DEGREES if instance.cores % t == 0):
        sharding = shard_heads(tp, shape.heads, shape.kv_heads)
        params = shape.parameters(sharding.heads, sharding.kv_heads)
        norms = shape.norm_parameters()
        weights = ((params - norms) // tp + norms) * dtype_bytes
        kv = 2 * shape.layers * (sharding.kv_heads // tp) * shape.head_dim * sequence_length * dtype_bytes
        out.append(Candidate(sharding, weights, kv, budget, instance.cores // tp))
    return out


@dataclass(frozen=True)
class Plan:
    shape: ModelShape
    model_id: str
    instance: InstanceType
    dtype: str
    sequence_length: int
    requested_batch: int  # what the core group must hold: the given batch size, or one sequence
    batch_size: int
    chosen: Candidate
    candidates: list[Candidate]

    def summary(self) -> dict[str, Any]:
        c, dtype_bytes = self.chosen, DTYPE_BYTES[self.dtype]
        return {
            "model": self.shape.name,
            "model_id": self.model_id,
            "instance": self.instance.name,
            "dtype": self.dtype,
            "parameters": self.shape.parameters(),
            "cores_per_replica": c.tp,
            "replicas": c.replicas,
            "batch_size": self.batch_size,
            "max_batch_size_that_fits": c.max_batch,
            "sequence_length": self.sequence_length,
            "sharding": c.sharding.kind,
            "weights_gib": round(self.shape.parameters() * dtype_bytes / GIB, 2),
            "kv_cache_gib_per_replica": round(self.batch_size * c.kv_per_sequence_per_core * c.tp / GIB, 2),
            "weights_gib_per_core": round(c.weights_per_core / GIB, 2),
            "kv_cache_gib_per_core": round(self.batch_size * c.kv_per_sequence_per_core / GIB, 2),
            "memory_gib_per_core": round(c.memory_per_core(self.batch_size) / GIB, 2),
            "budget_gib_per_core": round(c.budget_per_core / GIB, 2),
        }


def _choose(cands: list[Candidate], batch: int) -> Candidate | None:
    fitting = [c for c in cands if c.memory_per_core(batch) <= c.budget_per_core]
    exact = [c for c in fitting if c.sharding.exact]
    return (exact or fitting or [None])[0]


def plan(
    shape: ModelShape, model_id: str, instance: InstanceType, *,
    sequence_length: int, batch_size: int | None = None, dtype: str = "bf16",
) -> Plan:
    """The smallest core group that holds the model with `batch_size` (or one) sequences, and its batch."""
    if sequence_length > shape.max_positions:
        raise PlanError(f"--sequence-length ({sequence_length}) must be <= the model's max_position_embeddings "
                        f"({shape.max_positions})")
    cands = candidates(shape, instance, sequence_length, DTYPE_BYTES[dtype])
    chosen = _choose(cands, batch_size or 1)
    if chosen is None:
        raise PlanError(_does_not_fit(shape, instance, sequence_length, batch_size or 1, dtype))
    batch = batch_size or min(chosen.max_batch, MAX_BATCH_SIZE)
    return Plan(shape, model_id, instance, dtype, sequence_length, batch_size or 1, batch, chosen, cands)


def _does_not_fit(shape: ModelShape, instance: InstanceType, sequence_length: int, batch: int, dtype: str) -> str:
    weights = shape.parameters() * DTYPE_BYTES[dtype] / GIB
    usable = instance.hbm_gib_per_core - HEADROOM_GIB_PER_CORE
    elsewhere = []
    for other in INSTANCE_TYPES.values():
        found = _choose(candidates(shape, other, sequence_length, DTYPE_BYTES[dtype]), batch)
        if other is not instance and found is not None:
            elsewhere.append(f"{other.name} (tp {found.tp})")
    where = f" It fits on: {', '.join(elsewhere)}." if elsewhere else " No instance type in the table holds it."
    return (f"{shape.name} does not fit on {instance.name}: {weights:.1f} GiB of {dtype} weights plus the KV cache of "
            f"{batch} sequence(s) of {sequence_length} tokens exceed {instance.cores} NeuronCores x {usable:.1f} GiB "
            f"usable ({HEADROOM_GIB_PER_CORE:.0f} GiB of each core's {instance.hbm_gib_per_core:.0f} GiB kept for the "
            f"runtime) for every core group tried ({', '.join(str(c) for c in TP_DEGREES if instance.cores % c == 0)}).{where}")


def table(p: Plan) -> str:
    """The reasoning, one row per core-group size."""
    s, dtype_bytes = p.shape, DTYPE_BYTES[p.dtype]
    rows = [
        f"{s.name}: {s.model_type}, {s.parameters() / 1e9:.2f} B parameters, {s.layers} layers, "
        f"{s.heads} heads / {s.kv_heads} KV heads x {s.head_dim}, {p.dtype} weights {s.parameters() * dtype_bytes / GIB:.2f} GiB",
        f"{p.instance.name}: {p.instance.cores} NeuronCores on {p.instance.devices} device(s), "
        f"{p.instance.hbm_gib_per_core:.0f} GiB HBM per core, {p.chosen.budget_per_core / GIB:.1f} GiB usable "
        f"({HEADROOM_GIB_PER_CORE:.0f} GiB runtime headroom); sequence length {p.sequence_length}",
        "",
        f"{'tp':>3}  {'q/kv heads':>10}  {'sharding':<10}  {'weights/core':>12}  {'KV/seq/core':>11}  "
        f"{'at batch ' + str(p.requested_batch):>13}  {'fits':<4}  {'max batch':>9}  {'replicas':>8}",
    ]
    for c in p.candidates:
        fits = c.memory_per_core(p.requested_batch) <= c.budget_per_core
        rows.append(
            f"{c.tp:>3}  {f'{c.sharding.heads}/{c.sharding.kv_heads}':>10}  {c.sharding.kind:<10}  "
            f"{c.weights_per_core / GIB:>8.2f} GiB  {c.kv_per_sequence_per_core / 2**20:>7.0f} MiB  "
            f"{c.memory_per_core(p.requested_batch) / GIB:>9.2f} GiB  {'yes' if fits else 'no':<4}  "
            f"{c.max_batch:>9}  {c.replicas:>8}"
        )
    c = p.chosen
    why = "the smallest exact core group that fits" if c.sharding.exact else "no exact core group fits; smallest padded one"
    rows += ["", f"plan: cores_per_replica {c.tp} ({why}), {c.replicas} replica(s) per {p.instance.name}, "
                 f"batch {p.batch_size} (max {c.max_batch} fits), sequence length {p.sequence_length}: "
                 f"{c.memory_per_core(p.batch_size) / GIB:.2f} of {c.budget_per_core / GIB:.1f} GiB per core"]
    if s.parameters() * dtype_bytes / GIB > p.instance.memory_gib / 2:
        rows.append(f"note: the weights take more than half of {p.instance.name}'s {p.instance.memory_gib} GiB of host "
                    "memory: serve a model compiled elsewhere (compiling needs more)")
    if s.model_type not in NEURON_MODEL_TYPES:
        rows.append(f"note: optimum-neuron 0.4.5 has no text-generation model for model_type {s.model_type!r}")
    return "\n".join(rows)


def serve_config_for(p: Plan, template: dict[str, Any], max_workers: int = DEFAULT_MAX_WORKERS) -> dict[str, Any]:
    """`template` (the root serve_config.yaml) with the plan's args in its first application."""
    config = json.loads(json.dumps(template))
    app = config["applications"][0]
    rows = p.batch_size * p.chosen.replicas * max_workers
    app["args"] = {
        **app.get("args", {}),
        "model_id": p.model_id,
        "backend": "neuron",
        "cores_per_replica": p.chosen.tp,
        "max_batch_size": p.batch_size,
        "max_total_tokens": p.sequence_length,
        "max_input_tokens": p.sequence_length // 2,  # neuronx-tgi's default
        "max_concurrent_requests": 2 * rows,  # every row busy and one batch waiting, on every replica
        # used when model_id is not compiled yet (neuronx-tgi's HF_* export settings)
        "export_batch_size": p.batch_size,
        "export_sequence_length": p.sequence_length,
        "export_auto_cast_type": p.dtype,
        "export_num_cores": p.chosen.tp,
    }
    return config


def write_outputs(p: Plan, out_dir: Path, template: dict[str, Any], *, image: str, min_workers: int, max_workers: int) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    serve_config = serve_config_for(p, template, max_workers)
    header = (f"# Written by scripts/plan.py for {p.model_id} on {p.instance.name} ({p.dtype}, sequence length "
              f"{p.sequence_length}):\n# {p.chosen.replicas} replica(s) x {p.chosen.tp} NeuronCores, batch {p.batch_size}. "
              "Run it with `serve run serve_config.yaml`.\n")
    serve_path, manifest_path = out_dir / "serve_config.yaml", out_dir / "rayservice.yaml"
    serve_path.write_text(header + yaml.safe_dump(serve_config, sort_keys=False, width=4096))
    manifest = render_rayservice(serve_config, image=image, instance_type=p.instance.name,
                                 min_workers=min_workers, max_workers=max_workers)
    manifest_path.write_text(manifest_text(manifest))
    return [serve_path, manifest_path]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="hub id, or a local config.json or model directory")
    parser.add_argument("--instance", required=True, choices=sorted(INSTANCE_TYPES))
    parser.add_argument("--sequence-length", type=int, help=f"tokens per sequence (default: model's, at most {DEFAULT_MAX_TOTAL_TOKENS})")
    parser.add_argument("--batch-size", type=int, help="check this batch size instead of finding the largest")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_BYTES))
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the plan")
    parser.add_argument("--out-dir", type=Path, help="write serve_config.yaml and rayservice.yaml here")
    parser.add_argument("--image", default=DEFAULT_IMAGE, help="container image for rayservice.yaml")
    parser.add_argument("--min-workers", type=int, default=DEFAULT_MIN_WORKERS, help="inf2 worker pods, at least")
    parser.add_argument("--max-workers", type=int, default=DEFAULT_MAX_WORKERS, help="inf2 worker pods, at most")
    args = parser.parse_args(argv)
    if args.sequence_length is not None and args.sequence_length < 2:
        parser.error("--sequence-length must be >= 2")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be >= 1")

    try:
        config, model_id = read_model_config(args.model, os.environ.get("HF_TOKEN"))
        shape = ModelShape.from_config(config, name=args.model)
        sequence_length = args.sequence_length or min(shape.max_positions, DEFAULT_MAX_TOTAL_TOKENS)
        p = plan(shape, model_id, lookup(args.instance), sequence_length=sequence_length,
                 batch_size=args.batch_size, dtype=args.dtype)
        print(table(p))
        if args.out_dir:
            template = yaml.safe_load(SERVE_CONFIG.read_text())
            for path in write_outputs(p, args.out_dir, template, image=args.image,
                                      min_workers=args.min_workers, max_workers=args.max_workers):
                print(f"wrote {path}")
    except (PlanError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(p.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
