"""The `simulated` backend: an Inferentia2 core group's timing, with deterministic tokens and no compute.

It sleeps for as long as a compiled decoder of the same size would take on the same number of
NeuronCores, so one machine can host a whole inf2.48xlarge worth of replicas and the serving path
(engine, Ray, HTTP) is measured at fleet scale. Tokens depend only on a row's own previous token
and position, so they are the same whatever shares the batch, and never end-of-sequence.

The timing model (`Inf2Timing`), with its sources:

- Decode is bound by reading the weights once per step: time = weights per core / (HBM bandwidth per
  core x efficiency) + rows x a per-row cost that grows with the weights per core.
  HBM: 820 GB/s per Inferentia2 device, 2 NeuronCores per device (AWS inf2 instance page) → 410 GB/s
  per core. Fitted to Llama-3.1-8B (16 GB in bf16) on 8 cores: batch 1 ≈ 83 tok/s (ITL 11–12 ms),
  batch 8 ≈ 333 tok/s (24 ms), batch 32 ≈ 505 tok/s (63 ms) (AWS Neuron / Hugging Face inf2 benchmark
  figures quoted in shared/notes/neuron.md): ITL ≈ 11 ms + 1.6 ms x batch, i.e. an efficiency of 0.44
  and 0.8 ms per row per GB of weights per core. Check: Llama-3-8B on 2 cores (inf2.8xlarge, vLLM),
  2 requests → 57 ms predicted, 53 ms published.
- A decode step costs the same however many rows are busy: the compiled graph runs the whole batch.
- Prefill is bound by compute: time = 2 x params x tokens / (cores x effective FLOP/s) + a call
  overhead. Peak is ~95 TFLOP/s bf16 per NeuronCore-v2 (190 per device); fitted to "≈ 8.3 s to
  prefill 32 long prompts" for the same 8B model on 8 cores, ~16% of peak → 15 TFLOP/s per core.
  With continuous batching each sequence is its own context-encoding call.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AbstractSet, Sequence

import torch

from . import PrefillOutput

HBM_BYTES_PER_S_PER_CORE = 410e9
DECODE_EFFICIENCY = 0.44
PER_ROW_S_PER_GB_PER_CORE = 0.0008
PREFILL_FLOPS_PER_CORE = 15e12
CALL_OVERHEAD_S = 0.002  # per context-encoding call (decode's is inside the fitted efficiency)


@dataclass(frozen=True)
class Inf2Timing:
    params: float  # model parameters
    cores: int  # NeuronCores in the group (tensor-parallel degree)
    bytes_per_param: int = 2  # bf16

    @property
    def weights_gb_per_core(self) -> float:
        return self.params * self.bytes_per_param / self.cores / 1e9

    def decode_s(self, rows: int) -> float:
        weights_read = self.weights_gb_per_core * 1e9 / (HBM_BYTES_PER_S_PER_CORE * DECODE_EFFICIENCY)
        return weights_read + rows * PER_ROW_S_PER_GB_PER_CORE * self.weights_gb_per_core

    def prefill_s(self, tokens: int) -> float:
        """One context-encoding call over `tokens` prompt tokens."""
        return CALL_OVERHEAD_S + 2 * self.params * tokens / (self.cores * PREFILL_FLOPS_PER_CORE)


def count_parameters(model_dir: Path) -> float:
    """A Llama-style decoder's parameter count, from its config.json."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    hidden, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    head_dim = c.get("head_dim") or hidden // c["num_attention_heads"]
    kv = c.get("num_key_value_heads", c["num_attention_heads"]) * head_dim
    attention = hidden * (c["num_attention_heads"] * head_dim) * 2 + hidden * kv * 2
    mlp = 3 * hidden * c["intermediate_size"]
    embeddings = vocab * hidden * (1 if c.get("tie_word_embeddings") else 2)
    return float(layers * (attention + mlp + 2 * hidden) + embeddings + hidden)


class SimulatedBackend:
    prefills_subset = True
    samples_on_device = False

    def __init__(self, batch_size: int, max_tokens: int, vocab_size: int, timing: Inf2Timing,
                 avoid_ids: AbstractSet[int] = frozenset(), sleep=time.sleep):
        self.batch_size = batch_size
        self.max_tokens = self.max_prefill_tokens = max_tokens
        self.vocab_size = vocab_size
        self.timing = timing
        self.sleep = sleep
        self.allowed = [i for i in range(vocab_size) if i not in avoid_ids]
        self.description = (f"simulated inf2, {timing.params / 1e9:.1f}B params on {timing.cores} cores "
                            f"({timing.decode_s(batch_size) * 1000:.0f} ms/decode step at batch {batch_size})")

    def _next_token(self, token: int, position: int) -> int:
        return self.allowed[(token * 7919 + position * 104729) % len(self.allowed)]

    def _one_hot(self, tokens: list[int]) -> torch.Tensor:
        logits = torch.full((len(tokens), self.vocab_size), -30.0)
        logits[torch.arange(len(tokens)), torch.tensor(tokens)] = 0.0
        return logits

    def prefill(self, rows: Sequence[int], token_ids: Sequence[Sequence[int]], prompt_logprobs: bool = False,
                sampling=None) -> PrefillOutput:
        self.sleep(sum(self.timing.prefill_s(len(ids)) for ids in token_ids))
        return PrefillOutput(self._one_hot([self._next_token(ids[-1], len(ids) - 1) for ids in token_ids]))

    def decode(self, rows: Sequence[int], token_ids: Sequence[int], positions: Sequence[int], sampling=None) -> torch.Tensor:
        self.sleep(self.timing.decode_s(self.batch_size))  # a static batch: every row runs, busy or not
        return self._one_hot([self._next_token(t, p) for t, p in zip(token_ids, positions)])
