"""The ingress's guards, without Ray: its own disconnect watch, long text kept off the event loop, and a
whole generation's event source closed as it returns."""

from __future__ import annotations

import asyncio

from deployments.http_api import DisconnectCancels

OFF = [(b"x-request-disconnect-disabled", b"?1")]


def scope(headers):
    return {"type": "http", "method": "POST", "path": "/generate", "headers": headers}


def test_it_cancels_the_route_when_the_client_goes_after_its_body():
    async def main():
        messages = asyncio.Queue()
        for m in ({"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.request", "body": b"}"}):
            messages.put_nowait(m)
        state = {}

        async def route(scope, receive, send):
            body = b""
            while True:
                m = await receive()
                body += m["body"]
                if not m.get("more_body"):
                    break
            state["body"] = body
            try:
                await asyncio.sleep(60)  # generating
            except asyncio.CancelledError:
                state["cancelled"] = True
                raise

        serving = asyncio.ensure_future(DisconnectCancels(route)(scope(OFF), messages.get, None))
        await asyncio.sleep(0.05)
        messages.put_nowait({"type": "http.disconnect"})
        await asyncio.wait_for(serving, 5)  # returns: the client is gone, nothing to answer
        return state

    assert asyncio.run(main()) == {"body": b"{}", "cancelled": True}


def test_it_reads_nothing_a_route_does_not_read():
    """A body sent to a route that never reads it stays in the server's flow control, not in a queue."""
    async def main():
        reads = 0

        async def receive():
            nonlocal reads
            reads += 1
            return {"type": "http.request", "body": b"x" * 65536, "more_body": True}  # endless

        async def route(scope, receive, send):
            await asyncio.sleep(0.1)

        await DisconnectCancels(route)(scope(OFF), receive, None)
        return reads

    assert asyncio.run(main()) == 0


def test_long_text_is_tokenized_off_the_event_loop_and_the_same(tokenizer):
    """A megabyte takes about a second to tokenize: in a worker thread, with the tokenizer's batch call
    (which lets go of the GIL), the ingress's other streams go on; the tokens are the same."""
    import threading

    from deployments.service import _off_loop_if_long
    from deployments.validation import OFF_LOOP_CHARS, encode

    long_text = "Once upon a time, 世界 🚀. " * (OFF_LOOP_CHARS // 10)
    assert encode(tokenizer, long_text, True).ids == tokenizer.backend_tokenizer.encode(long_text).ids

    async def main():
        here = threading.get_ident()
        return [await _off_loop_if_long(text, threading.get_ident) != here for text in ("short", long_text)]

    assert asyncio.run(main()) == [False, True]


def test_a_whole_generation_closes_its_event_source_as_it_returns():
    """`BatcherSource.stream` gives back the request's inbox queue and its count in flight (`/health` reads
    it) as it closes: at once, on the last event or an error, not once the generator is collected."""
    from neuron_serve.errors import ServeError
    from neuron_serve.request import ErrorEvent, Finish, FinishReason, Token, TokenEvent

    from deployments.responses import gather

    closed = []

    async def source(last):
        try:
            yield [TokenEvent("r", 1, Token(5, "a", 0.0, False))]
            yield [last]
            yield [TokenEvent("r", 9, Token(5, "never", 0.0, False))]
        finally:
            closed.append(type(last).__name__)

    finish = Finish(FinishReason.LENGTH, "ab", 2, None, 0.0, 0.0)
    finished = source(TokenEvent("r", 2, Token(6, "b", 0.0, False), finish=finish))  # held here: not collected
    failed = source(ErrorEvent("r", "the batcher failed"))

    async def main():
        generated = await gather(finished)
        assert generated.finish is finish and closed == ["TokenEvent"]
        try:
            await gather(failed)
        except ServeError as e:
            assert closed == ["TokenEvent", "ErrorEvent"] and "the batcher failed" in str(e)
        else:
            raise AssertionError("an error event must raise")

    asyncio.run(main())
