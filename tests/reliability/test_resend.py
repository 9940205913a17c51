"""BatcherSource resends a request whose replica was lost before its first event, and only then."""

from __future__ import annotations

import asyncio

from ray.exceptions import ActorDiedError

from deployments.ingress import BatcherSource
from neuron_serve.request import ErrorEvent, Finish, FinishReason, GenerationRequest, SamplingParams, StoppingParams, Token, TokenEvent


class Response:
    """A streamed handle call: yields lists of events, then fails with `error` if given."""

    def __init__(self, batches, error=None):
        self.batches, self.error, self.cancelled = batches, error, False

    def __aiter__(self):
        return self._run()

    async def _run(self):
        for batch in self.batches:
            yield batch
        if self.error:
            raise self.error

    def cancel(self):
        self.cancelled = True


class Handle:
    def __init__(self, responses):
        self.responses, self.calls = list(responses), 0

    def options(self, **_):
        return self

    @property
    def generate(self):
        return self

    def remote(self, request):
        self.calls += 1
        return self.responses.pop(0)


REQUEST = GenerationRequest("r1", (1, 2), SamplingParams(), StoppingParams(2))


def token(index: int, last: bool = False) -> TokenEvent:
    finish = Finish(FinishReason.LENGTH, "ab", 2, None, 0.0, 0.0) if last else None
    return TokenEvent("r1", index, Token(5, "a", 0.0, False), [], None, finish)


def collect(handle) -> list:
    async def go():
        return [e async for events in BatcherSource(handle).stream(REQUEST) for e in events]

    return asyncio.run(go())


def test_lost_before_the_first_event_is_sent_again():
    handle = Handle([Response([], ActorDiedError()), Response([[token(1)], [token(2, last=True)]])])
    events = collect(handle)
    assert handle.calls == 2 and [e.index for e in events] == [1, 2]


def test_lost_after_events_flowed_ends_with_one_error():
    lost = Response([[token(1)]], ActorDiedError())
    handle = Handle([lost])
    events = collect(handle)
    assert handle.calls == 1 and isinstance(events[-1], ErrorEvent) and len(events) == 2
    assert "the replica serving it failed (ActorDiedError)" in events[-1].message and lost.cancelled


def test_gives_up_after_three_lost_replicas():
    handle = Handle([Response([], ActorDiedError()) for _ in range(3)])
    [error] = collect(handle)
    assert handle.calls == 3 and isinstance(error, ErrorEvent)
