"""The step loop on its thread: concurrent callers, batched hand-over, cancellation by walking away."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from neuron_serve import async_engine as async_engine_module
from neuron_serve.async_engine import AsyncEngine
from neuron_serve.request import ErrorEvent, TokenEvent

from .helpers import make_engine, request


@pytest.fixture
def async_engine(tiny_model_dir, tokenizer):
    engine = AsyncEngine(make_engine(tiny_model_dir, tokenizer, batch_size=2))
    yield engine
    engine.stop()


async def collect(engine, req, delay=0.0):
    events = []
    async for chunk in engine.generate(req):
        events.extend(chunk)
        await asyncio.sleep(delay)
    return events


def test_concurrent_callers_get_their_own_tokens(async_engine, tokenizer, reference):
    prompts = [tokenizer(p).input_ids for p in ["Hello", "What is Deep Learning?", "Once upon a time"]]

    async def main():
        async_engine.start()
        return await asyncio.gather(*(collect(async_engine, request(i, p, 12)) for i, p in enumerate(prompts)))

    results = asyncio.run(main())
    for prompt, events in zip(prompts, results):
        assert [e.token.id for e in events] == reference(prompt, 12)
        assert isinstance(events[-1], TokenEvent) and events[-1].finish is not None


def test_a_slow_caller_gets_piled_up_events_in_one_list(async_engine, tokenizer, reference):
    prompt = tokenizer("Hello").input_ids

    async def main():
        async_engine.start()
        chunks = []
        async for chunk in async_engine.generate(request("slow", prompt, 30)):
            chunks.append(chunk)
            await asyncio.sleep(0.05)
        return chunks

    chunks = asyncio.run(main())
    assert [e.token.id for c in chunks for e in c] == reference(prompt, 30)
    assert len(chunks) < 30


def counting_decodes(backend) -> list:
    """One item per decode step the backend runs from now on."""
    decodes, real_decode = [], backend.decode

    def decode(*args, **kwargs):
        decodes.append(1)
        return real_decode(*args, **kwargs)

    backend.decode = decode
    return decodes


async def freed_by_the_cancel(async_engine, decodes: list) -> None:
    """The 200-token request's row is free, and by its cancel, not by its end (199 decode steps run to that)."""
    for _ in range(500):
        if not async_engine.engine.batch.active():
            break
        await asyncio.sleep(0.01)
    assert async_engine.engine.batch.free_rows() == [0, 1] and len(decodes) < 100
    assert async_engine.in_flight == 0


def test_walking_away_cancels_and_frees_the_row(async_engine, tokenizer, reference):
    prompt = tokenizer("Hello").input_ids
    decodes = counting_decodes(async_engine.engine.backend)

    async def main():
        async_engine.start()
        stream = async_engine.generate(request("gone", prompt, 200))
        async for _ in stream:
            break
        await stream.aclose()
        await freed_by_the_cancel(async_engine, decodes)
        return await collect(async_engine, request("next", prompt, 8))

    assert [e.token.id for e in asyncio.run(main())] == reference(prompt, 8)


def test_a_stream_interval_hands_tokens_over_in_groups_after_the_first(tiny_model_dir, tokenizer, reference):
    prompt = tokenizer("Hello").input_ids
    engine = AsyncEngine(make_engine(tiny_model_dir, tokenizer, batch_size=2), stream_interval=4)

    async def main():
        engine.start()
        return [chunk async for chunk in engine.generate(request("grouped", prompt, 14))]

    try:
        chunks = asyncio.run(main())
    finally:
        engine.stop()
    assert [e.token.id for c in chunks for e in c] == reference(prompt, 14)
    sizes = [len(c) for c in chunks]
    assert sizes[0] == 1  # the first token is not held back
    assert all(n >= 4 for n in sizes[1:-1]) and sum(sizes) == 14
    assert chunks[-1][-1].finish is not None  # the last group goes at once, however short


def test_a_stream_interval_below_one_is_refused(tiny_model_dir, tokenizer):
    with pytest.raises(ValueError, match="stream_interval"):
        AsyncEngine(make_engine(tiny_model_dir, tokenizer, batch_size=2), stream_interval=0)


def test_a_failing_deliver_ends_its_own_request_and_not_the_others(async_engine, tokenizer, reference):
    prompt = tokenizer("Hello").input_ids

    decodes = counting_decodes(async_engine.engine.backend)

    def broken(events):
        raise RuntimeError("the caller's channel broke")

    async def main():
        async_engine.start()
        failed = async_engine.open(request("broken", prompt, 200), broken)
        events = await asyncio.wait_for(collect(async_engine, request("fine", prompt, 12)), 60)
        with pytest.raises(RuntimeError, match="channel broke"):
            await asyncio.wait_for(failed, 60)
        await freed_by_the_cancel(async_engine, decodes)
        return events

    assert [e.token.id for e in asyncio.run(main())] == reference(prompt, 12)


def test_a_steps_tokens_go_out_before_its_metrics_are_recorded(tiny_model_dir, tokenizer):
    """What a delivery schedules on the loop (the channel's flush of the step's frame) runs before
    `on_step`, so that recording metrics never holds up a token."""
    prompt = tokenizer("Hello").input_ids
    order = []
    engine = AsyncEngine(make_engine(tiny_model_dir, tokenizer, batch_size=2),
                         on_step=lambda stats: order.append("metrics"))

    def deliver(events):
        asyncio.get_running_loop().call_soon(order.append, "flush")

    async def main():
        engine.start()
        last = await asyncio.wait_for(engine.open(request("ordered", prompt, 6), deliver), 60)
        await asyncio.sleep(0.1)  # the last step's metrics
        return last

    try:
        last = asyncio.run(main())
    finally:
        engine.stop()
    assert last.finish is not None
    assert order == ["flush", "metrics"] * 6


def test_between_steps_runs_on_the_step_thread_after_every_step_and_while_idle(tiny_model_dir, tokenizer, monkeypatch):
    """Where the batcher makes its Ray metric calls (`BatcherMetrics.flush`), away from the event loop."""
    monkeypatch.setattr(async_engine_module, "IDLE_WAIT_S", 0.05)
    calls = []
    engine = AsyncEngine(make_engine(tiny_model_dir, tokenizer, batch_size=2),
                         between_steps=lambda: calls.append(threading.current_thread()))

    async def main():
        engine.start()
        await asyncio.wait_for(engine.open(request("r", tokenizer("Hello").input_ids, 6), lambda events: None), 60)
        after_the_steps = len(calls)
        await asyncio.sleep(0.3)
        return after_the_steps

    try:
        after_the_steps = asyncio.run(main())
    finally:
        engine.stop()
    assert after_the_steps >= 6  # a prefill and 5 decode steps
    assert len(calls) > after_the_steps  # idle, it still runs
    assert {thread.name for thread in calls} == {"engine-step-loop"}


def test_what_the_last_steps_on_step_queued_is_flushed_while_idle_not_before_the_next_first_token(
        tiny_model_dir, tokenizer):
    """The batcher's metrics of a request's last step are queued on the loop after the step thread has gone
    idle; they are made then, not in front of the next request's first token (IDLE_WAIT_S is 1 s)."""
    queued = []

    def on_step(stats):
        time.sleep(0.05)  # the step thread is asleep by the time this step's metrics are queued
        queued.append(stats)

    def between_steps():
        queued.clear()

    engine = AsyncEngine(make_engine(tiny_model_dir, tokenizer, batch_size=2), on_step=on_step,
                         between_steps=between_steps)

    async def main():
        engine.start()
        await asyncio.sleep(0.1)  # past the idle step thread's first flush
        await asyncio.wait_for(engine.open(request("r", tokenizer("Hello").input_ids, 3), lambda events: None), 60)
        await asyncio.sleep(0.3)  # the last step's on_step, and the flush after it
        return list(queued)

    try:
        left = asyncio.run(main())
    finally:
        engine.stop()
    assert left == []


def test_a_failing_between_steps_is_logged_and_the_steps_go_on(tiny_model_dir, tokenizer, reference, caplog):
    def broken():
        raise RuntimeError("metrics are down")

    engine = AsyncEngine(make_engine(tiny_model_dir, tokenizer, batch_size=2), between_steps=broken)
    prompt = tokenizer("Hello").input_ids
    try:
        events = asyncio.run(asyncio.wait_for(collect(engine, request("r", prompt, 6)), 60))
    finally:
        engine.stop()
    assert [e.token.id for e in events] == reference(prompt, 6)
    assert "between_steps failed" in caplog.text


def test_between_steps_past_step_timeout_makes_the_engine_unhealthy_until_it_returns(tiny_model_dir, tokenizer):
    """It runs on the step thread: while it hangs, no step runs."""
    hang = threading.Event()

    def flush():
        if hang.is_set():
            hang.clear()
            time.sleep(1.5)

    async_engine = AsyncEngine(make_engine(tiny_model_dir, tokenizer, batch_size=2), step_timeout_s=0.5,
                               between_steps=flush)

    async def main():
        async_engine.start()
        prompt = tokenizer("Hello").input_ids
        await collect(async_engine, request("first", prompt, 2))
        before = async_engine.healthy
        hang.set()
        async_engine._wake.set()
        await asyncio.sleep(1.0)
        during = async_engine.healthy
        await asyncio.wait_for(collect(async_engine, request("after", prompt, 2)), 60)
        return before, during, async_engine.healthy

    try:
        before, during, after = asyncio.run(main())
    finally:
        async_engine.stop()
    assert before and not during and after


def test_a_step_past_step_timeout_makes_the_engine_unhealthy_until_it_ends(tiny_model_dir, tokenizer, reference):
    from neuron_serve.backends.faults import FaultInjectingBackend

    engine = make_engine(tiny_model_dir, tokenizer, batch_size=2)
    engine.backend = FaultInjectingBackend(engine.backend)
    engine.backend.arm("prefill", 1, stall_s=2.5)
    async_engine = AsyncEngine(engine, step_timeout_s=0.5)
    prompt = tokenizer("Hello").input_ids

    async def main():
        async_engine.start()
        stalled = asyncio.create_task(collect(async_engine, request("stalled", prompt, 4)))
        await asyncio.sleep(0.1)
        within = async_engine.healthy
        await asyncio.sleep(1.1)
        past = async_engine.healthy
        events = await stalled
        return within, past, async_engine.healthy, events

    try:
        within, past, after, events = asyncio.run(main())
    finally:
        async_engine.stop()
    assert within and not past and after
    assert [e.token.id for e in events] == reference(prompt, 4)  # the step went on once the stall ended


def test_a_crash_before_the_steps_plan_fails_the_requests_held_and_the_loop_serves_on(async_engine, tokenizer, reference):
    """A bug the engine's own step cannot contain (here its scheduler raises once): `fail_all` ends every
    request it holds with an error, and the step thread goes on to serve the next."""
    prompt = tokenizer("Hello").input_ids
    scheduler = async_engine.engine.scheduler
    real_schedule, calls = scheduler.schedule, []

    def schedule(*args):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("a scheduler bug")
        return real_schedule(*args)

    scheduler.schedule = schedule

    async def main():
        async_engine.start()
        running = asyncio.ensure_future(collect(async_engine, request("running", prompt, 50)))
        results = await asyncio.wait_for(asyncio.gather(running, return_exceptions=True), 60)
        after = await asyncio.wait_for(collect(async_engine, request("after", prompt, 6)), 60)
        return results[0], after

    running, after = asyncio.run(main())
    assert isinstance(running[-1], ErrorEvent) and "a scheduler bug" in running[-1].message
    assert [e.token.id for e in after] == reference(prompt, 6)
    assert async_engine.engine.batch.free_rows() == [0, 1] and async_engine.in_flight == 0


def test_an_id_in_flight_cannot_be_opened_twice(async_engine, tokenizer):
    prompt = tokenizer("Hello").input_ids

    async def main():
        async_engine.start()
        first = async_engine.open(request("same", prompt, 4), lambda events: None)
        with pytest.raises(ValueError, match="already in flight"):
            async_engine.open(request("same", prompt, 4), lambda events: None)
        return await asyncio.wait_for(first, 60)

    assert asyncio.run(main()).finish is not None
