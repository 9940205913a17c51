"""BatcherSource resends a request whose replica was lost before its first event, and only then; a call that
returns without its last event ends the stream there; a request that waits for its first event while its
app is being deleted ends with a 503."""

from __future__ import annotations

import asyncio

from ray.exceptions import ActorDiedError

from deployments.ingress import BatcherSource
from neuron_serve.request import ErrorEvent, Finish, FinishReason, GenerationRequest, SamplingParams, StoppingParams, Token, TokenEvent


class Inbox:
    def __init__(self):
        self.queues = {}

    async def address(self):
        return "this ingress"

    def open(self, request_id):
        self.queues[request_id] = asyncio.Queue()
        return self.queues[request_id]

    def close(self, request_id):
        del self.queues[request_id]


class Response:
    """A handle call: after `delay_s`, puts lists of events in the inbox, then fails with `error` if given."""

    def __init__(self, batches, error=None, delay_s=0.0):
        self.batches, self.error, self.delay_s, self.cancelled, self.inbox = batches, error, delay_s, False, None

    def __await__(self):
        return self._run().__await__()

    async def _run(self):
        await asyncio.sleep(self.delay_s)
        for batch in self.batches:
            self.inbox.put_nowait(batch)
            await asyncio.sleep(0.01)
        if self.error:
            raise self.error

    def cancel(self):
        self.cancelled = True


class Handle:
    def __init__(self, responses):
        self.responses, self.calls, self.inbox = list(responses), 0, Inbox()

    @property
    def generate(self):
        return self

    def remote(self, request, reply_to):
        assert reply_to == "this ingress"
        self.calls += 1
        response = self.responses.pop(0)
        response.inbox = self.inbox.queues[request.id]
        return response


REQUEST = GenerationRequest("r1", (1, 2), SamplingParams(), StoppingParams(2))


def token(index: int, last: bool = False) -> TokenEvent:
    finish = Finish(FinishReason.LENGTH, "ab", 2, None, 0.0, 0.0) if last else None
    return TokenEvent("r1", index, Token(5, "a", 0.0, False), [], None, finish)


class Deletion:
    """The app-deletion check: says `deleting`, counting the times it is asked."""

    def __init__(self, deleting: bool):
        self.deleting, self.asked = deleting, 0

    async def __call__(self) -> bool:
        self.asked += 1
        return self.deleting


def collect(handle, deletion=None) -> list:
    async def go():
        source = BatcherSource(handle, handle.inbox, deletion or Deletion(False))
        return [e async for events in source.stream(REQUEST) for e in events]

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


def test_a_call_that_returns_without_its_last_event_ends_the_stream_there(monkeypatch):
    monkeypatch.setattr(BatcherSource, "LAST_EVENTS_WAIT_S", 0.1)
    handle = Handle([Response([[token(1)]])])
    assert [e.index for e in collect(handle)] == [1]  # no last event: the caller reports it incomplete


def test_a_request_that_waits_while_its_app_is_deleted_ends_with_a_503(monkeypatch):
    monkeypatch.setattr(BatcherSource, "DELETION_CHECK_S", 0.05)
    queued = Response([[token(1)]], delay_s=10)  # Serve would hold it: no batcher is left to take it
    deletion = Deletion(True)
    [error] = collect(Handle([queued]), deletion)
    assert isinstance(error, ErrorEvent) and error.error_type == "unhealthy" and "shutting down" in error.message
    assert deletion.asked == 1 and queued.cancelled


def test_a_request_that_waits_while_its_app_lives_keeps_waiting(monkeypatch):
    monkeypatch.setattr(BatcherSource, "DELETION_CHECK_S", 0.05)
    slow = Response([[token(1)], [token(2, last=True)]], delay_s=0.3)  # e.g. a batcher scaling up from zero
    deletion = Deletion(False)
    assert [e.index for e in collect(Handle([slow]), deletion)] == [1, 2]
    assert deletion.asked >= 3 and not slow.cancelled


def test_queue_time_counts_the_wait_in_serves_queue():
    """Serve holds a request while every batcher has `max_ongoing_requests` in hand (here 0.3 s before
    the call starts); as in TGI's router queue, that wait is queue time, and the engine's inference time
    is left as the engine measured it."""
    queued = Response([[token(1)], [token(2, last=True)]], delay_s=0.3)
    events = collect(Handle([queued]))
    finish = events[-1].finish
    assert finish.inference_time == 0.0 and 0.3 <= finish.queue_time < 5.0


def test_generating_is_a_request_with_tokens_in_flight_and_no_failure_since():
    """What `/health` trusts without asking the batchers: not a token seen once, not after the request
    ended (its batcher may be gone), not after a generation failed."""
    def watch(response) -> tuple[list[bool], bool]:
        async def go():
            handle = Handle([response])
            source = BatcherSource(handle, handle.inbox, Deletion(False))
            during = [source.generating async for _ in source.stream(REQUEST)]
            return during, source.generating

        return asyncio.run(go())

    assert watch(Response([[token(1)], [token(2, last=True)]])) == ([True, True], False)
    assert watch(Response([[token(1)]], ActorDiedError())) == ([True, False], False)
