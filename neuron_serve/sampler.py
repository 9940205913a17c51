"""Choosing next tokens on the host.

Each request gets a `RequestSampler` when it enters the batch: its penalties (transformers' processors,
which apply to greedy requests too), its warpers when it samples, and a generator seeded for it alone,
so that the same seed gives the same tokens whatever else shares the batch. `choose` then works on the
whole batch's logits at once: rows that only need an argmax cost nothing extra, as in TGI's
heterogeneous chooser. Log-probabilities are those of the distribution the token was drawn from
(after the penalties and warpers).

The warpers keep the tokens transformers' `TopKLogitsWarper`, `TopPLogitsWarper` and
`TypicalLogitsWarper` keep, in that order, after the temperature, but top-p does not sort the whole
vocabulary, and the draw is one uniform number against the kept tokens' cumulative sum rather than
`torch.multinomial`. With a 128k vocabulary, a batch of 8 at `temperature` 0.7 and `top_p` 0.9 took
about 90 ms of host time a step through transformers' warpers, as long as an 8B model's own decode step
at batch 8 on two NeuronCores, and takes under 5 now (`scripts/bench_engine.py` prints both ways)."""

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
    TypicalLogitsWarper,
)

from .request import SamplingParams

# Top-p looks at the likeliest 64 tokens first, then at 2048 while they hold too little of the probability,
# then sorts the vocabulary. At 128k tokens on one host core: 0.17, 0.8 and 8.3 ms.
TOP_P_LOOKS = (64, 2048, math.inf)


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
        self.penalties = LogitsProcessorList(penalties)
        self.temperature = params.temperature if params.do_sample else 1.0
        self.typical = TypicalLogitsWarper(params.typical_p) if params.do_sample and params.typical_p < 1.0 else None
        self.seed: int | None = None
        self.generator: torch.Generator | None = None
        if params.do_sample:
            self.seed = params.seed if params.seed is not None else random.getrandbits(63)
            self.generator = torch.Generator().manual_seed(self.seed)

    @property
    def needs_history(self) -> bool:
        return len(self.penalties) > 0

    @property
    def greedy_argmax(self) -> bool:
        """The batch's plain argmax is this row's choice: no penalty, no sampling."""
        return not self.needs_history and self.generator is None


@dataclass
class Choice:
    token_id: int
    logprob: float
    top_ids: list[int]  # the `top_n_tokens` most likely tokens, most likely first
    top_logprobs: list[float]


def _scores(sampler: RequestSampler, history: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
    """One row's scores after its penalties and temperature. In float32, unless that overflows: TGI's
    parameters are float32, so a temperature or penalty can be as small as 1e-45 and divide the scores
    past float32's range (never past float64's, where such a row is run again)."""
    ids = torch.tensor([list(history)], dtype=torch.long, device=logits.device) if sampler.needs_history else None

    def apply(scores: torch.Tensor) -> torch.Tensor:
        if ids is not None:
            scores = sampler.penalties(ids, scores[None])[0]
        return scores / sampler.temperature if sampler.temperature != 1.0 else scores

    row = apply(logits.to(torch.float32, copy=True))
    if not torch.isfinite(row.max()):  # +inf or NaN (all -inf, which no processor leaves, reruns harmlessly)
        row = apply(logits.double())
    return row


def _kept(scores: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tokens top-k, then top-p, keep, as transformers' warpers keep them: their scores and ids, the
    most likely first; (scores, None) when they keep every token.

    Top-p without sorting the vocabulary where it can: it looks at the likeliest tokens first, and
    widens the look (TOP_P_LOOKS) only while they hold less than `top_p` of the probability, as no token
    past them can then be kept."""
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        values, ids = scores.topk(top_k)
        tied = int((scores >= values[-1]).sum())  # transformers keeps every token tied with the k-th
        if tied > top_k:
            values, ids = scores.topk(tied)
        total = values.double().logsumexp(-1)
    elif top_p < 1.0:
        total = scores.double().logsumexp(-1)
        for look in TOP_P_LOOKS:
            values, ids = scores.topk(look) if look < vocab else scores.sort(descending=True)
            if look >= vocab or (values.double() - total).exp().sum() >= top_p:
                break
    else:
        return scores, None
    if top_p < 1.0:
        # In float64: summed from the likeliest down, float32 loses the tail a `top_p` near 1 cuts.
        probs = (values.double() - total).exp()
        before = torch.cat([probs.new_zeros(1), probs.cumsum(-1)[:-1]])  # the mass of the likelier tokens
        kept = int((before < top_p).sum())  # at least the first: top_p > 0
        values, ids = values[:kept], ids[:kept]
    return values, ids


def _draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One index drawn with probability `probs[i]`: the inverse of their cumulative sum at a uniform number.
    The same distribution as torch.multinomial's draw, at a tenth of its cost over a 128k vocabulary."""
    cumulative = probs.detach().cpu().double().cumsum(-1)
    total = cumulative[-1]
    if not (torch.isfinite(total) and total > 0):
        raise ValueError(f"this request's sampling distribution is not a distribution (its mass is {float(total)})")
    drawn = torch.rand((), dtype=torch.float64, generator=generator) * total
    return min(int(torch.searchsorted(cumulative, drawn, right=True)), len(cumulative) - 1)


def _sampled(sampler: RequestSampler, scores: torch.Tensor) -> tuple[int, torch.Tensor]:
    """A token drawn from `scores` as the request's warpers leave them, and that distribution's log-probs
    over the vocabulary (-inf where a warper ruled a token out)."""
    params = sampler.params
    values, ids = _kept(scores, params.top_k, params.top_p)
    if sampler.typical is not None:
        values = sampler.typical(None, values[None])[0]
    kept_logprobs = torch.log_softmax(values, dim=-1)
    drawn = _draw(kept_logprobs.exp(), sampler.generator)
    if ids is None:
        return drawn, kept_logprobs
    row = torch.full_like(scores, -math.inf)
    row[ids] = kept_logprobs
    return int(ids[drawn]), row


def first_largest(rows: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (the first index of its largest value, or of its first NaN), as torch's. On the CPU
    numpy's: over 8 rows of a 128k vocabulary, 0.2 ms against torch's 2.4 on one core."""
    if rows.device.type != "cpu":
        return rows.argmax(dim=-1)
    return torch.from_numpy(rows.detach().numpy().argmax(-1))


def choose(logits: torch.Tensor, samplers: Sequence[RequestSampler],
           histories: Sequence[Sequence[int]]) -> list[Choice | Exception]:
    """Next token for each row of `logits` [rows, vocab]; `histories[i]`: row i's prompt + generated ids.

    A row whose own choice fails gets its exception in its place; the other rows of the batch get
    their tokens."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    token_ids = first_largest(logprobs)
    failed: dict[int, Exception] = {}
    for i, sampler in enumerate(samplers):
        if sampler.greedy_argmax:
            continue
        try:
            scores = _scores(sampler, histories[i], logits[i])
            if sampler.generator is None:
                row = torch.log_softmax(scores, dim=-1)
                token_ids[i] = int(first_largest(row[None])[0])
            else:
                token, row = _sampled(sampler, scores)
                token_ids[i] = token
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
