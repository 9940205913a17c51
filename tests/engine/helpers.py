"""Building engines and running them to completion in one line, for the engine tests."""

from __future__ import annotations

from collections import defaultdict

from neuron_serve.config import Config, resolve_limits
from neuron_serve.engine import Engine
from neuron_serve.loading import open_torch_backend
from neuron_serve.model_files import eos_token_ids
from neuron_serve.request import GenerationRequest, SamplingParams, StoppingParams, TokenEvent
from neuron_serve.scheduler import InsertionPolicy, PrefillPolicy


def make_engine(model_dir, tokenizer, *, batch_size=4, max_total_tokens=256, insertion="insert", eos_ids=None,
                backend=None, **policy) -> Engine:
    config = Config(model_id=str(model_dir), max_batch_size=batch_size, max_total_tokens=max_total_tokens,
                    insertion=insertion)
    if backend is None:
        backend, limits = open_torch_backend(config, model_dir)
    else:
        limits = resolve_limits(config, max_positions=1024)
    return Engine(backend, tokenizer, limits, eos_ids if eos_ids is not None else eos_token_ids(model_dir, tokenizer),
                  insertion=InsertionPolicy(insertion), prefill_policy=PrefillPolicy(**policy))


def request(rid, input_ids, max_new_tokens=16, stop=(), prompt_logprobs=False, **sampling) -> GenerationRequest:
    return GenerationRequest(str(rid), tuple(input_ids), SamplingParams(**sampling),
                             StoppingParams(max_new_tokens, tuple(stop)), prompt_logprobs=prompt_logprobs)


def run(engine: Engine, arrivals: dict[int, list[GenerationRequest]], max_steps=10_000, on_step=None):
    """Submit `arrivals[k]` before step k, step until idle; events per request id."""
    events = defaultdict(list)
    step = 0
    while step < max_steps and (engine.has_work or any(k >= step for k in arrivals)):
        for req in arrivals.get(step, []):
            engine.submit(req)
        if on_step:
            on_step(step, engine, events)
        for event in engine.step():
            events[event.request_id].append(event)
        step += 1
    return dict(events)


def token_ids(events) -> list[int]:
    assert all(isinstance(e, TokenEvent) for e in events), events
    return [e.token.id for e in events]
