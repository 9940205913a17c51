"""DisconnectCancels: the app's own watch for a client that turned Serve's off (no Ray here)."""

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
