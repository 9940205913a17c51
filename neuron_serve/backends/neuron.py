"""The `neuron` backend: the engine's two calls on optimum-neuron's compiled `NeuronModelForCausalLM`.

A compiled model has static shapes: `batch_size` KV-cache rows (our slots), `sequence_length`
positions, prompts of at most `max_context_length`. Every call passes `input_ids`, `position_ids`,
`seq_ids` and `sampling_params`, right-padded, as optimum-neuron 0.4.5 requires. Two shapes exist:

- continuous batching (`neuron_config.continuous_batching`): a prefill writes only the KV rows named
  by `seq_ids`, so new requests are inserted while the others keep their cache (`insert`);
- whole-batch prefill: the context-encoding graph rewrites every row from position 0, so each
  prefill must carry every active row (`rebuild`); rows are passed in row order, empty rows get a
  one-token filler.

Prompts are padded to `max_context_length` with position 0, so the graph's "last token" (the first
maximum of the positions) is each row's real last token, even for a one-token prompt. Decode always
names every active row (the graph pads missing rows with copies of row 0, which would overwrite an
active row left out). With on-device sampling the graph returns token ids instead of logits; they
come back as one-hot logits (`samples_on_device`), which the engine reads with a greedy sampler: exactly
that token, logprob 0, no host draw.

The Neuron libraries are imported only when this backend is opened.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from ..request import SamplingParams
from . import PrefillOutput

logger = logging.getLogger(__name__)

FLOAT32_TINY = torch.finfo(torch.float32).tiny
INSTALL_HINT = (
    "the neuron backend needs the AWS Neuron SDK (torch-neuronx, neuronx-distributed, libneuronxla): "
    "pip install -e '.[neuron]' --extra-index-url https://pip.repos.neuron.amazonaws.com"
)


def neuron_model_class():
    """optimum-neuron's model class, or one clear sentence of what to install."""
    from importlib.util import find_spec

    missing = [name for name in ("torch_neuronx", "neuronx_distributed", "libneuronxla") if find_spec(name) is None]
    if missing:
        raise ImportError(f"{INSTALL_HINT} (missing: {', '.join(missing)})")
    from optimum.neuron import NeuronModelForCausalLM

    return NeuronModelForCausalLM


class NeuronBackend:
    """`Backend` on a loaded optimum-neuron decoder model (or anything with its `forward` contract)."""

    def __init__(self, model, vocab_size: int, pad_token_id: int = 0):
        nc = model.neuron_config
        self.model = model
        self.batch_size = nc.batch_size
        self.max_tokens = nc.sequence_length
        self.max_prefill_tokens = nc.max_context_length or nc.sequence_length
        self.vocab_size = vocab_size
        self.prefills_subset = bool(nc.continuous_batching)
        self.samples_on_device = bool(nc.on_device_sampling)
        self.max_topk = getattr(nc, "max_topk", 256)
        self.pad_token_id = pad_token_id
        dtype = str(nc.torch_dtype).removeprefix("torch.")
        shape = "continuous batching" if self.prefills_subset else "whole-batch prefill"
        sampling = ", on-device sampling (greedy/top-k/top-p/temperature)" if self.samples_on_device else ""
        self.description = (
            f"neuron tp{nc.tp_degree} {dtype}, batch {nc.batch_size} x {nc.sequence_length} tokens, {shape}{sampling}"
        )

    # -- the two calls ---------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(
        self,
        rows: Sequence[int],
        token_ids: Sequence[Sequence[int]],
        prompt_logprobs: bool = False,
        sampling: Sequence[SamplingParams] | None = None,
    ) -> PrefillOutput:
        too_long = [len(ids) for ids in token_ids if len(ids) > self.max_prefill_tokens]
        if too_long:
            raise ValueError(f"a prompt of {max(too_long)} tokens exceeds the compiled max_context_length {self.max_prefill_tokens}")
        order = self._call_order(rows)
        by_row = dict(zip(rows, token_ids))
        params = dict(zip(rows, sampling or [None] * len(rows)))
        # [n, max_context_length]: right-padded ids; positions 0..len-1 then 0, so the first maximum is the last token.
        input_ids = torch.full((len(order), self.max_prefill_tokens), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((len(order), self.max_prefill_tokens), dtype=torch.long)
        for i, row in enumerate(order):
            ids = by_row.get(row, [self.pad_token_id])
            input_ids[i, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
            position_ids[i, : len(ids)] = torch.arange(len(ids))
        out = self._forward(input_ids, position_ids, order, [params.get(r) for r in order])
        index = {row: i for i, row in enumerate(order)}
        return PrefillOutput(logits=out[[index[r] for r in rows]])

    @torch.inference_mode()
    def decode(
        self,
        rows: Sequence[int],
        token_ids: Sequence[int],
        positions: Sequence[int],
        sampling: Sequence[SamplingParams] | None = None,
    ) -> torch.Tensor:
        order = self._call_order(rows)
        by_row = {r: (t, p) for r, t, p in zip(rows, token_ids, positions)}
        params = dict(zip(rows, sampling or [None] * len(rows)))
        fill = (self.pad_token_id, 0)  # an empty row of a whole-batch graph: one filler token at position 0
        input_ids = torch.tensor([[by_row.get(r, fill)[0]] for r in order], dtype=torch.long)  # [n, 1]
        position_ids = torch.tensor([[by_row.get(r, fill)[1]] for r in order], dtype=torch.long)  # [n, 1]
        out = self._forward(input_ids, position_ids, order, [params.get(r) for r in order])
        index = {row: i for i, row in enumerate(order)}
        return out[[index[r] for r in rows]]

    # -- helpers ---------------------------------------------------------------------------------

    def _call_order(self, rows: Sequence[int]) -> list[int]:
        """Rows as the graph takes them: sorted seq_ids with continuous batching, every row otherwise."""
        return sorted(rows) if self.prefills_subset else list(range(self.batch_size))

    def _sampling_params(self, params: list[SamplingParams | None]) -> torch.Tensor:
        """[n, 3] float32 (top_k, top_p, temperature): greedy unless sampling happens on the device."""
        values = []
        for p in params:
            if not self.samples_on_device or p is None or not p.do_sample:
                values.append([1.0, 1.0, 1.0])
            else:
                top_k = min(p.top_k, self.max_topk) if p.top_k > 0 else self.max_topk
                # Positive below float32's range would be 0 there, which the device refuses for the whole batch.
                values.append([float(top_k), max(p.top_p, FLOAT32_TINY), max(p.temperature, FLOAT32_TINY)])
        return torch.tensor(values, dtype=torch.float32)

    def _forward(self, input_ids, position_ids, order: list[int], params: list[SamplingParams | None]) -> torch.Tensor:
        out = self.model.forward(
            input_ids=input_ids,
            position_ids=position_ids,
            seq_ids=torch.tensor(order, dtype=torch.long),
            sampling_params=self._sampling_params(params),
        )
        if self.samples_on_device:  # token ids [n]: one-hot logits, which the engine reads with a greedy sampler
            logits = torch.full((len(order), self.vocab_size), float("-inf"))
            logits[torch.arange(len(order)), out.reshape(-1).long()] = 0.0
            return logits
        return out[:, -1, : self.vocab_size].float()  # [n, 1, V padded for tp] → [n, V]
