"""Scheduling policy with a scripted backend and no model: which rows each prefill and decode gets."""

from __future__ import annotations

from collections import deque

import pytest
import torch

from neuron_serve.backends import PrefillOutput
from neuron_serve.batch import StaticBatch
from neuron_serve.scheduler import InsertionPolicy, PrefillPolicy, Scheduler, WaitingRequest

from .helpers import make_engine, request, run, token_ids

VOCAB = 50


class ScriptedBackend:
    """Next token = last token + 1 (mod VOCAB); records every call."""

    batch_size, max_tokens, max_prefill_tokens, vocab_size, prefills_subset, description = 4, 1024, 1024, VOCAB, True, "scripted"
    samples_on_device = False

    def __init__(self):
        self.calls = []

    def _logits(self, last_tokens):
        logits = torch.zeros(len(last_tokens), VOCAB)
        for i, t in enumerate(last_tokens):
            logits[i, (t + 1) % VOCAB] = 10.0
        return logits

    def prefill(self, rows, token_ids, prompt_logprobs=False, sampling=None):
        self.calls.append(("prefill", list(rows), [list(t) for t in token_ids]))
        return PrefillOutput(self._logits([t[-1] for t in token_ids]))

    def decode(self, rows, token_ids, positions, sampling=None):
        self.calls.append(("decode", list(rows), list(positions)))
        return self._logits(token_ids)


@pytest.fixture
def scripted(tiny_model_dir, tokenizer):
    def build(insertion="insert", **policy):
        backend = ScriptedBackend()
        engine = make_engine(tiny_model_dir, tokenizer, batch_size=4, insertion=insertion, backend=backend, eos_ids=set(), **policy)
        return engine, backend
    return build


def test_insert_prefills_only_new_rows(scripted):
    engine, backend = scripted("insert")
    events = run(engine, {0: [request("a", [10, 11], 5)], 2: [request("b", [20, 21, 22], 3)]})
    assert token_ids(events["a"]) == [12, 13, 14, 15, 16] and token_ids(events["b"]) == [23, 24, 25]
    assert backend.calls[0] == ("prefill", [0], [[10, 11]])
    assert backend.calls[1] == ("decode", [0], [2])
    assert backend.calls[2] == ("prefill", [1], [[20, 21, 22]])
    assert backend.calls[3] == ("decode", [0, 1], [3, 3])


def test_rebuild_reprefills_every_active_row_from_its_token_ids(scripted):
    engine, backend = scripted("rebuild")
    events = run(engine, {0: [request("a", [10, 11], 5)], 2: [request("b", [20, 21, 22], 3)]})
    assert token_ids(events["a"]) == [12, 13, 14, 15, 16] and token_ids(events["b"]) == [23, 24, 25]
    # "a" has generated 12 and 13; 13 is pending (not in the cache yet), so the rebuild stops before it.
    assert backend.calls[2] == ("prefill", [0, 1], [[10, 11, 12], [20, 21, 22]])
    assert backend.calls[3] == ("decode", [0, 1], [3, 3])


def test_prefill_budget_and_free_rows_bound_admission():
    scheduler = Scheduler(PrefillPolicy(), InsertionPolicy("insert"), max_batch_prefill_tokens=10, max_prefill_tokens=64)
    waiting = deque(WaitingRequest(request(i, [1] * 4), 0.0) for i in range(6))
    plan = scheduler.schedule(waiting, StaticBatch(4))
    assert [(w.request.id, row) for w, row in plan.admit] == [("0", 0), ("1", 1)]  # 4 + 4 <= 10 < 12
    assert len(waiting) == 4


@pytest.mark.parametrize("ratio, max_waiting, running, insertable, steps, expected", [
    (0.0, 20, 3, 1, 0, True),     # eager: any free row is filled at once
    (0.0, 20, 0, 1, 0, True),     # empty batch: always prefill
    (1.0, 20, 3, 1, 0, False),    # 1 waiting < 1.0 x 3 running: keep decoding
    (1.0, 20, 3, 1, 20, True),    # ... unless it has waited max_waiting_tokens steps
    (1.0, 20, 3, 3, 0, True),
    (0.5, 20, 4, 0, 50, False),   # nothing insertable (no row or no request)
])
def test_prefill_policy(ratio, max_waiting, running, insertable, steps, expected):
    assert PrefillPolicy(ratio, max_waiting).should_prefill(insertable, running, steps) is expected


def test_waiting_served_ratio_delays_insertion_until_max_waiting_tokens(scripted):
    engine, backend = scripted("insert", waiting_served_ratio=2.0, max_waiting_tokens=5)
    run(engine, {0: [request("a", [1], 30)], 1: [request("b", [2], 3)]})
    kinds = [c[0] for c in backend.calls]
    assert kinds[:7] == ["prefill", "decode", "decode", "decode", "decode", "decode", "prefill"]


def test_a_prefill_into_a_running_batch_says_why_in_tgis_words(scripted):
    """`tgi_batch_concat{reason}`: a new batch is no concatenation; enough waiting requests is TGI's
    `backpressure`, a request that waited `max_waiting_tokens` steps its `wait_exceeded`."""
    engine, _ = scripted("insert", waiting_served_ratio=1.0, max_waiting_tokens=3)
    reasons = []
    for step, arrivals in enumerate([[request("a", [1], 30)], [request("b", [2], 30)], [request("c", [3], 30)],
                                     [], [], []]):
        for r in arrivals:
            engine.submit(r)
        engine.step()
        if engine.last_step.kind == "prefill":
            reasons.append((step, engine.last_step.concat))
    # b goes in at once (1 waiting >= 1.0 x 1 running); c (1 < 1.0 x 2) waits 3 decode steps.
    assert reasons == [(0, None), (1, "backpressure"), (5, "wait_exceeded")]
