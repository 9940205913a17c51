"""The backend protocol: the forward pass over a static batch, and nothing else.

A backend owns the model weights and a KV cache preallocated for `[batch_size, max_tokens]`. Rows of
that cache are the engine's slots. Two calls run the model; they never share a call, as on Neuron,
where prefill ("context encoding") and decode ("token generation") are separate compiled graphs:

- `prefill(rows, token_ids)` writes the KV cache of the given rows from position 0 and returns the
  logits at each row's last token. With `prefills_subset` the other rows' caches are untouched
  (optimum-neuron's continuous batching with `seq_ids`); without it a prefill must name every active
  row (whole-batch context encoding), which is the engine's `rebuild` insertion policy.
- `decode(rows, token_ids, positions)` feeds one token per row at the given position and returns
  the next-token logits.

Sampling, stopping and text all live in the engine; a backend returns logits only. Each call also
receives the rows' `SamplingParams`, for a backend that samples on its device: it then returns
one-hot logits of the tokens it chose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence

if TYPE_CHECKING:
    import torch

    from ..request import SamplingParams


@dataclass
class PrefillOutput:
    logits: torch.Tensor  # [rows, vocab]: next-token logits at each row's last prompt token
    # Per row, when asked for: [len(token_ids[i])] log-probability of each prompt token given the
    # ones before it (the first, which has no context, is NaN).
    prompt_logprobs: list[torch.Tensor] | None = None


class Backend(Protocol):
    batch_size: int  # rows of the static batch (KV-cache rows)
    max_tokens: int  # positions per row (max_total_tokens)
    max_prefill_tokens: int  # the longest row a prefill takes (Neuron: the compiled max_context_length)
    vocab_size: int
    prefills_subset: bool  # a prefill may name only some rows, leaving the others' KV cache as it is
    samples_on_device: bool  # the forward picks each row's token: its logits are one-hot, and the host only reads them
    description: str  # one line for logs and /info, e.g. "torch cpu float32"

    def prefill(
        self,
        rows: Sequence[int],
        token_ids: Sequence[Sequence[int]],
        prompt_logprobs: bool = False,
        sampling: Sequence[SamplingParams] | None = None,
    ) -> PrefillOutput:
        """Write rows' KV caches from `token_ids` (position 0 onwards); logits at each last token."""
        ...

    def decode(
        self,
        rows: Sequence[int],
        token_ids: Sequence[int],
        positions: Sequence[int],
        sampling: Sequence[SamplingParams] | None = None,
    ) -> torch.Tensor:
        """One token per row at `positions[i]` (its KV is written there): logits [len(rows), vocab]."""
        ...
