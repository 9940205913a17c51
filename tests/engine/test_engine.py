"""The engine against transformers' `generate`: greedy tokens equal, however requests arrive."""

from __future__ import annotations

import pytest

from neuron_serve.request import ErrorEvent, FinishReason

from .helpers import make_engine, request, run, token_ids

PROMPTS = [
    "What is Deep Learning?",
    "Hello 🚀 世界",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "Q: What is the capital of France?\nA:",
    "a",
    "Once upon a time there was a small lighthouse at the end of a long stone pier. Every evening the keeper",
]


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return [tokenizer(p).input_ids for p in PROMPTS]


@pytest.mark.parametrize("insertion", ["insert", "rebuild"])
@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_greedy_equals_transformers_with_late_insertions(tiny_model_dir, tokenizer, reference, prompt_ids, insertion, batch_size):
    engine = make_engine(tiny_model_dir, tokenizer, batch_size=batch_size, insertion=insertion)
    # Requests arrive while others are mid-decode; different prompt lengths and output lengths.
    arrivals = {0: [request(0, prompt_ids[0], 12)], 3: [request(1, prompt_ids[1], 20), request(2, prompt_ids[2], 7)],
                4: [request(3, prompt_ids[3], 15)], 9: [request(4, prompt_ids[4], 10), request(5, prompt_ids[5], 18)]}
    events = run(engine, arrivals)
    for reqs in arrivals.values():
        for req in reqs:
            assert token_ids(events[req.id]) == reference(req.input_ids, req.stopping.max_new_tokens), req.id
    assert engine.batch.free_rows() == list(range(batch_size))


def test_insert_4_steps_late_gives_the_same_tokens_as_alone(tiny_model_dir, tokenizer, reference, prompt_ids):
    engine = make_engine(tiny_model_dir, tokenizer, batch_size=2)
    alone = token_ids(run(engine, {0: [request("a", prompt_ids[0], 10)]})["a"])
    together = run(engine, {0: [request("b", prompt_ids[2], 20)], 4: [request("a", prompt_ids[0], 10)]})
    assert token_ids(together["a"]) == alone == reference(prompt_ids[0], 10)


def test_full_batch_of_identical_prompts(tiny_model_dir, tokenizer, reference, prompt_ids):
    engine = make_engine(tiny_model_dir, tokenizer, batch_size=4)
    events = run(engine, {0: [request(i, prompt_ids[3], 12) for i in range(6)]})  # 6 requests, 4 rows
    for i in range(6):
        assert token_ids(events[str(i)]) == reference(prompt_ids[3], 12)


def test_final_event_reports_text_and_counts(tiny_model_dir, tokenizer, prompt_ids):
    engine = make_engine(tiny_model_dir, tokenizer)
    events = run(engine, {0: [request("x", prompt_ids[0], 9)]})["x"]
    finish = events[-1].finish
    assert [e.index for e in events] == list(range(1, 10))
    assert all(e.finish is None for e in events[:-1])
    assert finish.reason == FinishReason.LENGTH and finish.generated_tokens == 9
    assert finish.generated_text == tokenizer.decode(token_ids(events), skip_special_tokens=True)
    assert "".join(e.token.text for e in events) == finish.generated_text
    assert finish.seed is None and finish.queue_time >= 0 and finish.inference_time > 0


def test_queue_time_runs_from_submission_to_the_prefill_that_takes_the_request(tiny_model_dir, tokenizer, prompt_ids):
    engine = make_engine(tiny_model_dir, tokenizer, batch_size=1)
    events = run(engine, {0: [request("first", prompt_ids[0], 12), request("second", prompt_ids[1], 2)]})
    first, second = events["first"][-1].finish, events["second"][-1].finish
    # "second" waited for the one row through all of "first"'s generation
    assert first.queue_time < 0.1 * first.inference_time and second.queue_time >= 0.9 * first.inference_time


# The `Backend` attributes a wrapping backend copies from the one it wraps.
BACKEND_SHAPE = ("batch_size", "max_tokens", "max_prefill_tokens", "vocab_size", "prefills_subset", "samples_on_device",
                 "description")


class CancelDuringPrefill:
    """Wraps a backend; cancels a request while a prefill that contains it is running."""

    def __init__(self, backend, engine_ref, request_id):
        self.inner, self.engine_ref, self.request_id = backend, engine_ref, request_id
        for name in BACKEND_SHAPE:
            setattr(self, name, getattr(backend, name))

    def prefill(self, rows, token_ids, prompt_logprobs=False, sampling=None):
        self.engine_ref[0].cancel(self.request_id)
        return self.inner.prefill(rows, token_ids, prompt_logprobs, sampling)

    def decode(self, rows, token_ids, positions, sampling=None):
        return self.inner.decode(rows, token_ids, positions, sampling)


def test_a_request_sent_again_under_a_cancelled_id_runs(tiny_model_dir, tokenizer, reference, prompt_ids):
    """Cancelled, then submitted again under its id before the next step (a caller that gave up on one
    call and made another): the new one is served, whether the old one had a row or was waiting."""
    engine = make_engine(tiny_model_dir, tokenizer, batch_size=1)
    before = {}

    def on_step(step, engine, events):
        if step == 2:
            before.update({rid: len(events[rid]) for rid in ("again", "queued")})
            engine.cancel("again")  # decoding in the only row
            engine.cancel("queued")  # waiting behind it
            engine.submit(request("again", prompt_ids[1], 5))
            engine.submit(request("queued", prompt_ids[2], 5))

    events = run(engine, {0: [request("again", prompt_ids[0], 25), request("queued", prompt_ids[0], 25)]},
                 on_step=on_step)
    assert before == {"again": 2, "queued": 0}
    assert token_ids(events["again"][2:]) == reference(prompt_ids[1], 5)
    assert token_ids(events["queued"]) == reference(prompt_ids[2], 5)


@pytest.mark.parametrize("insertion", ["insert", "rebuild"])
def test_cancel_waiting_prefilling_and_decoding_frees_only_that_request(tiny_model_dir, tokenizer, reference, prompt_ids, insertion):
    engine = make_engine(tiny_model_dir, tokenizer, batch_size=2, insertion=insertion)
    keep = [request("keep", prompt_ids[2], 25)]
    arrivals = {0: keep + [request("decoding", prompt_ids[0], 25), request("waiting", prompt_ids[1], 25)]}

    def on_step(step, engine, events):
        if step == 2:  # "waiting" has no row yet: batch size 2
            assert engine.batch.find("waiting") is None
            engine.cancel("waiting")
        if step == 6:
            assert len(events["decoding"]) >= 3
            engine.cancel("decoding")
        if step == 7:  # the next step freed its row
            assert engine.batch.find("decoding") is None and len(engine.batch.free_rows()) == 1

    events = run(engine, arrivals, on_step=on_step)
    assert "waiting" not in events
    assert events["decoding"][-1].finish is None and len(events["decoding"]) < 25
    assert token_ids(events["keep"]) == reference(prompt_ids[2], 25)
    assert engine.batch.free_rows() == [0, 1]

    # Cancelled while its prefill runs: at most its first token comes out, then its row is free.
    holder = [None]
    engine = make_engine(tiny_model_dir, tokenizer, batch_size=2, insertion=insertion)
    engine.backend = CancelDuringPrefill(engine.backend, holder, "victim")
    holder[0] = engine
    events = run(engine, {0: [request("keep", prompt_ids[2], 25)], 3: [request("victim", prompt_ids[0], 25)]})
    assert len(events["victim"]) <= 1 and events["victim"][-1].finish is None
    assert token_ids(events["keep"]) == reference(prompt_ids[2], 25)
    assert engine.batch.free_rows() == [0, 1]


class FailingDecode:
    def __init__(self, backend, fail_at_call):
        self.inner, self.calls, self.fail_at_call = backend, 0, fail_at_call
        for name in BACKEND_SHAPE:
            setattr(self, name, getattr(backend, name))

    def prefill(self, rows, token_ids, prompt_logprobs=False, sampling=None):
        return self.inner.prefill(rows, token_ids, prompt_logprobs, sampling)

    def decode(self, rows, token_ids, positions, sampling=None):
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise RuntimeError("device fault")
        return self.inner.decode(rows, token_ids, positions, sampling)


def test_failed_step_fails_its_requests_and_the_engine_keeps_serving(tiny_model_dir, tokenizer, reference, prompt_ids):
    engine = make_engine(tiny_model_dir, tokenizer, batch_size=2)
    engine.backend = FailingDecode(engine.backend, fail_at_call=3)
    events = run(engine, {0: [request("a", prompt_ids[0], 10), request("b", prompt_ids[1], 10)],
                          20: [request("c", prompt_ids[2], 10)]})
    for rid in ("a", "b"):
        assert isinstance(events[rid][-1], ErrorEvent) and "device fault" in events[rid][-1].message
    assert token_ids(events["c"]) == reference(prompt_ids[2], 10)
    assert engine.batch.free_rows() == [0, 1]


@pytest.mark.parametrize("insertion", ["insert", "rebuild"])
def test_a_request_whose_sampler_cannot_be_built_fails_alone(tiny_model_dir, tokenizer, reference, prompt_ids, insertion):
    """The engine is a library too: a request it is handed with parameters no sampler takes (`typical_p` of -1,
    which HTTP validation refuses) fails at its prefill, and neither the requests prefilled with it nor the
    running ones notice."""
    engine = make_engine(tiny_model_dir, tokenizer, batch_size=4, insertion=insertion)
    bad = request("bad", prompt_ids[1], 10, do_sample=True, typical_p=-1.0)
    events = run(engine, {0: [request("running", prompt_ids[0], 10)], 2: [bad, request("beside", prompt_ids[2], 10)],
                          5: [request("alone", prompt_ids[1], 5, do_sample=True, typical_p=-1.0)]})
    assert [type(e).__name__ for e in events["bad"]] == ["ErrorEvent"] and "typical_p" in events["bad"][0].message
    assert token_ids(events["running"]) == reference(prompt_ids[0], 10)
    assert token_ids(events["beside"]) == reference(prompt_ids[2], 10)
    assert [type(e).__name__ for e in events["alone"]] == ["ErrorEvent"]  # a prefill of no request runs nothing
    assert engine.batch.free_rows() == [0, 1, 2, 3] and engine.consecutive_failures == 0


def test_a_fault_outside_the_forward_fails_every_request_held_and_the_engine_serves_on(
        tiny_model_dir, tokenizer, reference, prompt_ids, monkeypatch):
    """A bug after the requests left the queue (here, recording the step) ends every request the engine
    holds with an error, none left without its last event: the running ones, the ones admitted in that step,
    those still queued, and the one refused in it keeps its own error. The next request is served."""
    engine = make_engine(tiny_model_dir, tokenizer, batch_size=2)
    real_record, steps = engine._record, []

    def record(*args, **kwargs):
        steps.append(1)
        if len(steps) == 4:  # the prefill that admits "admitted"
            raise RuntimeError("a bug")
        real_record(*args, **kwargs)

    monkeypatch.setattr(engine, "_record", record)
    events = run(engine, {0: [request("running", prompt_ids[0], 10)],
                          3: [request("admitted", prompt_ids[1], 10), request("queued", prompt_ids[2], 10),
                              request("refused", (), 10)],
                          6: [request("after", prompt_ids[2], 6)]})
    for rid in ("running", "admitted", "queued"):
        assert isinstance(events[rid][-1], ErrorEvent) and "a bug" in events[rid][-1].message, rid
        assert sum(isinstance(e, ErrorEvent) for e in events[rid]) == 1
    assert [e.message for e in events["refused"]] == ["`inputs` cannot be empty"]
    assert token_ids(events["after"]) == reference(prompt_ids[2], 6)
    assert engine.batch.free_rows() == [0, 1] and not engine.waiting
