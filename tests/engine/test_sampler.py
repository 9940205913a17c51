"""Sampling: seeds that hold whatever the batch, processors that match transformers, real logprobs."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from neuron_serve.backends import torch_llama
from neuron_serve.request import SamplingParams, TokenEvent
from neuron_serve.sampler import FrequencyPenaltyLogitsProcessor, RequestSampler, choose, first_largest

from .helpers import make_engine, request, run, token_ids


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tokenizer):
    return make_engine(tiny_model_dir, tokenizer, batch_size=4)


@pytest.fixture(scope="module")
def prompt(tokenizer):
    return tokenizer("Once upon a time").input_ids


def sampled(**params):
    return dict(do_sample=True, **params)


def test_same_seed_same_tokens_alone_and_in_a_busy_batch(engine, tokenizer, prompt):
    params = sampled(seed=42, temperature=0.8, top_k=50, top_p=0.95)
    alone = token_ids(run(engine, {0: [request("s", prompt, 20, **params)]})["s"])
    others = [request(f"o{i}", tokenizer(t).input_ids, 30, **sampled(temperature=1.3))
              for i, t in enumerate(["Hello", "The sea is wide", "def fibonacci(n):"])]
    busy = run(engine, {0: others[:2], 2: [request("s", prompt, 20, **params)], 3: others[2:]})
    assert token_ids(busy["s"]) == alone
    again = run(engine, {0: [request("s", prompt, 20, **params)]})
    assert token_ids(again["s"]) == alone and again["s"][-1].finish.seed == 42


def test_different_seeds_differ_and_unseeded_requests_report_their_seed(engine, prompt):
    a = run(engine, {0: [request("a", prompt, 20, **sampled(seed=1))]})["a"]
    b = run(engine, {0: [request("b", prompt, 20, **sampled(seed=2))]})["b"]
    assert token_ids(a) != token_ids(b)
    c = run(engine, {0: [request("c", prompt, 20, **sampled())]})["c"]
    seed = c[-1].finish.seed
    assert isinstance(seed, int)
    replay = run(engine, {0: [request("d", prompt, 20, **sampled(seed=seed))]})["d"]
    assert token_ids(replay) == token_ids(c)


def test_top_k_1_is_greedy(engine, reference, prompt):
    events = run(engine, {0: [request("k", prompt, 15, **sampled(top_k=1, seed=3))]})["k"]
    assert token_ids(events) == reference(prompt, 15)


def test_repetition_penalty_matches_transformers(engine, reference, prompt):
    events = run(engine, {0: [request("r", prompt, 20, repetition_penalty=1.5)]})["r"]
    assert token_ids(events) == reference(prompt, 20, repetition_penalty=1.5)


@pytest.mark.parametrize("params", [
    dict(temperature=0.5), dict(top_k=5), dict(top_p=0.5), dict(typical_p=0.5),
    dict(frequency_penalty=1.5), dict(repetition_penalty=1.2, temperature=1.5, top_k=20, top_p=0.9, typical_p=0.9),
])
def test_every_warper_and_penalty_runs_in_a_mixed_batch(engine, prompt, params):
    events = run(engine, {0: [request("w", prompt, 12, **sampled(seed=5, **params)), request("g", prompt, 12)]})
    w = events["w"]
    assert isinstance(w[-1], TokenEvent) and w[-1].finish is not None  # to its length or an EOS, not an error
    assert all(math.isfinite(e.token.logprob) for e in w)


def test_warpers_restrict_the_choice():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    for seed in range(20):
        top2 = RequestSampler(SamplingParams(do_sample=True, top_k=2, seed=seed))
        assert choose(logits, [top2], [[0]])[0].token_id in (0, 1)
        nucleus = RequestSampler(SamplingParams(do_sample=True, top_p=0.5, seed=seed))
        assert choose(logits, [nucleus], [[0]])[0].token_id == 0


@pytest.mark.parametrize("scale", [3.0, 0.05], ids=["peaked", "flat"])  # flat: top-p widens its look to the whole vocabulary
@pytest.mark.parametrize("params", [
    dict(temperature=0.7), dict(top_k=40), dict(top_p=0.9), dict(top_p=0.3, temperature=1.7),
    dict(top_k=500, top_p=0.95), dict(typical_p=0.8), dict(top_p=0.9, typical_p=0.9, temperature=0.8),
])
def test_warped_distribution_is_transformers_warpers_distribution(params, scale):
    """What the sampler draws from (its top tokens over the whole vocabulary) is what transformers'
    warpers leave, token for token, though top-p sorts no more than it needs to."""
    vocab = 5000
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(7)) * scale
    sampler = RequestSampler(SamplingParams(do_sample=True, top_n_tokens=vocab, seed=0, **params))
    choice = choose(logits, [sampler], [[0]])[0]
    p = SamplingParams(do_sample=True, **params)
    warpers = [TemperatureLogitsWarper(p.temperature)] if p.temperature != 1.0 else []
    warpers += [TopKLogitsWarper(p.top_k)] if p.top_k else []
    warpers += [TopPLogitsWarper(p.top_p)] if p.top_p < 1.0 else []
    warpers += [TypicalLogitsWarper(p.typical_p)] if p.typical_p < 1.0 else []
    expected = torch.log_softmax(LogitsProcessorList(warpers)(torch.tensor([[0]]), logits.clone()), dim=-1)[0]
    kept = torch.isfinite(expected).nonzero()[:, 0]
    assert sorted(choice.top_ids) == kept.tolist() and choice.token_id in choice.top_ids
    ours = dict(zip(choice.top_ids, choice.top_logprobs))
    assert [ours[t] for t in kept.tolist()] == pytest.approx(expected[kept].tolist(), abs=1e-5)
    assert choice.logprob == ours[choice.token_id]


def test_top_k_keeps_the_tokens_tied_with_the_kth_as_transformers_does():
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0]])
    sampler = RequestSampler(SamplingParams(do_sample=True, top_k=2, top_n_tokens=4, seed=0))
    assert sorted(choose(logits, [sampler], [[0]])[0].top_ids) == [0, 1, 2]


def test_top_p_near_one_keeps_the_tail_transformers_keeps():
    """TGI's `top_p` is a float32, so 0.99999994 is valid; the mass it cuts is below float32's precision
    near 1, where summing from the likeliest token down loses it."""
    vocab = 128_256
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(3)) * 6
    top_p = 0.99999994
    sampler = RequestSampler(SamplingParams(do_sample=True, top_p=top_p, top_n_tokens=vocab, seed=0))
    kept = choose(logits, [sampler], [[0]])[0].top_ids
    expected = torch.isfinite(TopPLogitsWarper(top_p)(None, logits.clone()))[0].nonzero()[:, 0].tolist()
    assert sorted(kept) == expected and len(expected) < vocab


def test_draws_follow_the_distribution():
    """Over 4000 seeds, each token's share of the draws is its probability (its standard error is under 0.008)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -30.0]])
    probs = torch.softmax(logits[0], dim=-1).tolist()
    draws = [choose(logits, [RequestSampler(SamplingParams(do_sample=True, seed=seed))], [[0]])[0].token_id
             for seed in range(4000)]
    shares = [draws.count(t) / len(draws) for t in range(6)]
    assert shares == pytest.approx(probs, abs=0.012)  # seeded, so the same every run: these are within 0.007
    assert shares[5] == 0.0  # 1e-14: never


def test_top_tokens_leave_out_what_a_warper_ruled_out():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    top2 = RequestSampler(SamplingParams(do_sample=True, top_k=2, top_n_tokens=4, seed=0))
    choice = choose(logits, [top2], [[0]])[0]
    assert choice.top_ids == [0, 1] and all(math.isfinite(v) for v in choice.top_logprobs)


def test_frequency_penalty_lowers_each_token_by_its_share_of_the_sequence():
    """TGI's (`HeterogeneousFrequencyPenaltyLogitsProcessor`): penalty x count / length, not x count."""
    logits = torch.tensor([[3.0, 2.9, 0.0, 1.0]])
    ids = [[0, 0, 0, 1]]
    penalized = FrequencyPenaltyLogitsProcessor(2.0)(torch.tensor(ids), logits.clone())
    assert penalized[0].tolist() == pytest.approx([3.0 - 2.0 * 3 / 4, 2.9 - 2.0 * 1 / 4, 0.0, 1.0])
    plain = choose(logits, [RequestSampler(SamplingParams())], ids)[0]
    chosen = choose(logits, [RequestSampler(SamplingParams(frequency_penalty=2.0))], ids)[0]
    assert plain.token_id == 0 and chosen.token_id == 1


@pytest.mark.parametrize("insertion", ["insert", "rebuild"])
def test_a_temperature_near_zero_is_greedy_and_leaves_the_batch_alone(tiny_model_dir, tokenizer, reference, prompt,
                                                                       insertion):
    """TGI's parameters are float32: 1e-39 is a valid temperature, and divides the scores past float32's
    range. Its limit is greedy; the requests beside it, running or newly inserted, do not notice."""
    engine = make_engine(tiny_model_dir, tokenizer, batch_size=4, insertion=insertion)
    events = run(engine, {0: [request("running", prompt, 10)],
                          3: [request("beside", prompt, 10), request("cold", prompt, 10, **sampled(temperature=1e-39))]})
    assert {rid: token_ids(e) for rid, e in events.items()} == {rid: reference(prompt, 10) for rid in events}
    assert engine.consecutive_failures == 0


def test_a_request_whose_sampling_fails_fails_alone(engine, prompt, monkeypatch):
    """A fault in one request's own processors ends that request; its batch's forward did not fail."""
    def broken(input_ids, scores):
        raise RuntimeError("this request's processor broke")

    real_init = RequestSampler.__init__

    def init(self, params):
        real_init(self, params)
        if params.seed == 13:
            self.penalties = LogitsProcessorList([broken])

    monkeypatch.setattr(RequestSampler, "__init__", init)
    events = run(engine, {0: [request("ok", prompt, 6), request("bad", prompt, 6, **sampled(seed=13))]})
    assert len(token_ids(events["ok"])) == 6 and "processor broke" in events["bad"][-1].message
    assert engine.consecutive_failures == 0


@pytest.mark.parametrize("chunk", [256, 2], ids=["whole", "in-chunks"])
def test_logprobs_of_generated_and_prompt_tokens_match_the_model(engine, hf_model, prompt, chunk, monkeypatch):
    monkeypatch.setattr(torch_llama, "PROMPT_LOGPROBS_CHUNK", chunk)  # a prompt's logprobs a few positions at a time
    events = run(engine, {0: [request("l", prompt, 8, prompt_logprobs=True, top_n_tokens=3)]})["l"]
    generated = token_ids(events)
    ids = torch.tensor([list(prompt) + generated])
    with torch.inference_mode():
        logprobs = torch.log_softmax(hf_model(ids).logits[0].float(), dim=-1)
    for k, event in enumerate(events):
        position = len(prompt) - 1 + k
        assert event.token.logprob == pytest.approx(logprobs[position, event.token.id].item(), abs=1e-4)
        top = logprobs[position].topk(3)
        assert [t.id for t in event.top_tokens] == top.indices.tolist()
        assert [t.logprob for t in event.top_tokens] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert event.top_tokens[0].id == event.token.id  # greedy
    prefill = events[0].prompt_tokens
    assert [t.id for t in prefill] == list(prompt) and math.isnan(prefill[0].logprob)
    for k in range(1, len(prompt)):
        assert prefill[k].logprob == pytest.approx(logprobs[k - 1, prompt[k]].item(), abs=1e-4)
    assert all(e.prompt_tokens is None for e in events[1:])


def test_the_first_largest_is_torchs_argmax_ties_nan_and_infinities_included():
    nan, inf = math.nan, math.inf
    rows = torch.tensor([[1.0, 3.0, 3.0, 2.0], [-inf, -inf, 0.0, -inf], [0.0, nan, 5.0, nan], [-inf] * 4, [inf, 1.0, inf, 0.0]])
    assert first_largest(rows).tolist() == rows.argmax(dim=-1).tolist() == [1, 2, 1, 0, 0]
    wide = torch.randn(8, 128256)
    assert torch.equal(first_largest(wide), wide.argmax(dim=-1))
