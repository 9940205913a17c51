"""Choosing next tokens on the host, with transformers' logits processors.

Each request gets a `RequestSampler` when it enters the batch: its penalties (which apply to greedy
requests too), its warpers when it samples, and a generator seeded for it alone, so that the same
seed gives the same tokens whatever else shares the batch. `choose` then works on the whole batch's
logits at once: rows that only need an argmax cost nothing extra, as in TGI's heterogeneous chooser.
Log-probabilities are those of the distribution the token was drawn from (after the processors).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from .request import SamplingParams


class FrequencyPenaltyLogitsProcessor(LogitsProcessor):
    """TGI's frequency penalty: lower each token's score by penalty x its share of the sequence so far."""

    def __init__(self, penalty: float):
        self.penalty = penalty

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        counts = torch.zeros_like(scores).scatter_add_(1, input_ids, torch.ones_like(input_ids, dtype=scores.dtype))
        return scores - self.penalty * counts / input_ids.shape[1]


class RequestSampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        penalties = []
        if params.repetition_penalty != 1.0:
            penalties.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if params.frequency_penalty != 0.0:
            penalties.append(FrequencyPenaltyLogitsProcessor(params.frequency_penalty))
        warpers = []
        if params.do_sample:
            if params.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                warpers.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                warpers.append(TopPLogitsWarper(params.top_p))
            if params.typical_p < 1.0:
                warpers.append(TypicalLogitsWarper(params.typical_p))
        self.processors = LogitsProcessorList(penalties + warpers)
        self.seed: int | None = None
        self.generator: torch.Generator | None = None
        if params.do_sample:
            self.seed = params.seed if params.seed is not None else random.getrandbits(63)
            self.generator = torch.Generator().manual_seed(self.seed)

    @property
    def needs_history(self) -> bool:
        return len(self.processors) > 0


@dataclass
class Choice:
    token_id: int
    logprob: float
    top_ids: list[int]  # the `top_n_tokens` most likely tokens, most likely first
    top_logprobs: list[float]


def _processed(sampler: RequestSampler, history: Sequence[int], scores: torch.Tensor) -> torch.Tensor:
    """One row's scores after its processors. In float32, unless that overflows: TGI's parameters are
    float32, so a temperature or penalty can be as small as 1e-45 and divide the scores past float32's
    range (never past float64's, where such a row is run again)."""
    ids = torch.tensor([list(history)], dtype=torch.long, device=scores.device)
    row = sampler.processors(ids, scores.to(torch.float32, copy=True))
    if not torch.isfinite(row.max()):  # +inf or NaN (all -inf, which no processor leaves, reruns harmlessly)
        row = sampler.processors(ids, scores.double())
    return row


def choose(logits: torch.Tensor, samplers: Sequence[RequestSampler],
           histories: Sequence[Sequence[int]]) -> list[Choice | Exception]:
    """Next token for each row of `logits` [rows, vocab]; `histories[i]`: row i's prompt + generated ids.

    A row whose own choice fails gets its exception in its place; the other rows of the batch get
    their tokens."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    token_ids = logprobs.argmax(dim=-1)
    failed: dict[int, Exception] = {}
    for i, sampler in enumerate(samplers):
        if not sampler.needs_history and sampler.generator is None:
            continue  # greedy, no penalty: the batch's argmax
        try:
            row = logprobs[i]
            if sampler.needs_history:
                row = torch.log_softmax(_processed(sampler, histories[i], logits[i : i + 1]), dim=-1)[0]
                token_ids[i] = row.argmax()
            if sampler.generator is not None:
                token_ids[i] = torch.multinomial(row.exp().cpu(), 1, generator=sampler.generator)[0]
            logprobs[i] = row  # below float32's range: -inf, a token that could not be drawn
        except Exception as e:  # noqa: BLE001 (this request's parameters; the others go on)
            failed[i] = e
    chosen = logprobs.gather(1, token_ids[:, None])[:, 0]

    top_n = max(s.params.top_n_tokens for s in samplers)
    top_values = top_indices = None
    if top_n:
        top_values, top_indices = logprobs.topk(min(top_n, logprobs.shape[-1]), dim=-1)
        top_values, top_indices = top_values.tolist(), top_indices.tolist()

    ids, lps = token_ids.tolist(), chosen.tolist()
    choices: list[Choice | Exception] = []
    for i, sampler in enumerate(samplers):
        if i in failed:
            choices.append(failed[i])
            continue
        n = sampler.params.top_n_tokens
        # Tokens a warper ruled out (probability 0) are not among the top ones, as in TGI: fewer than n.
        top = [(t, v) for t, v in zip(top_indices[i][:n], top_values[i][:n]) if v != -math.inf] if n else []
        choices.append(Choice(ids[i], lps[i], [t for t, _ in top], [v for _, v in top]))
    return choices
