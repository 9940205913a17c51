"""The engine in a process of its own (ProcessCore), driven by AsyncEngine as a NeuronBatcher drives it."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from neuron_serve.async_engine import AsyncEngine
from neuron_serve.config import Config
from neuron_serve.engine_core import ProcessCore
from neuron_serve.request import ErrorEvent, TokenEvent

from .helpers import request


def config(model_dir, **overrides) -> Config:
    return Config(model_id=str(model_dir), backend="torch", max_batch_size=2, max_total_tokens=256, **overrides)


@pytest.fixture
def engine(tiny_model_dir):
    engine = AsyncEngine(ProcessCore(config(tiny_model_dir)))
    yield engine
    engine.stop()


async def collect(engine, req):
    return [e async for chunk in engine.generate(req) for e in chunk]


def test_the_engine_process_gives_transformers_tokens_to_concurrent_callers(engine, tokenizer, reference):
    prompts = [tokenizer(p).input_ids for p in ["Hello", "What is Deep Learning?", "Once upon a time"]]
    assert engine.core.facts.limits.max_batch_size == 2 and engine.core.facts.insertion == "insert"

    async def main():
        engine.start()
        return await asyncio.gather(*(collect(engine, request(i, p, 12)) for i, p in enumerate(prompts)))

    for prompt, events in zip(prompts, asyncio.run(main())):
        assert [e.token.id for e in events] == reference(prompt, 12)
        assert events[-1].finish is not None
    assert engine.healthy and engine.active == 0 and engine.waiting == 0


def test_a_dead_engine_process_fails_its_requests_and_the_core_reports_it(engine, tokenizer):
    prompt = tokenizer("Hello").input_ids

    async def main():
        engine.start()
        stream = engine.generate(request("long", prompt, 200))
        first = await anext(stream)
        os.kill(engine.core._process.pid, signal.SIGKILL)
        rest = [e async for chunk in stream for e in chunk]
        with pytest.raises(RuntimeError, match="engine process is gone"):
            await collect(engine, request("after", prompt, 4))
        return first, rest

    first, rest = asyncio.run(main())
    assert isinstance(first[0], TokenEvent)
    assert isinstance(rest[-1], ErrorEvent) and "engine process exited" in rest[-1].message
    assert not engine.healthy


def test_an_engine_that_cannot_load_says_why(tmp_path):
    with pytest.raises(RuntimeError, match="failed to start.*Error"):
        ProcessCore(config(tmp_path / "no-such-model"))


def test_armed_faults_reach_the_backend_in_the_engine_process(tiny_model_dir, tokenizer, reference):
    engine = AsyncEngine(ProcessCore(config(tiny_model_dir, fault_injection=True)))
    prompt = tokenizer("Hello").input_ids

    async def main():
        engine.start()
        engine.core.arm_fault("prefill", 1)
        failed = await collect(engine, request("faulty", prompt, 4))
        return failed, await collect(engine, request("fine", prompt, 4))

    try:
        failed, fine = asyncio.run(main())
    finally:
        engine.stop()
    assert isinstance(failed[-1], ErrorEvent) and "injected" in failed[-1].message.lower()
    assert [e.token.id for e in fine] == reference(prompt, 4)
