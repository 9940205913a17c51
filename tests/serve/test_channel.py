"""The channel from batcher to ingress: one frame per step, only with the secret, failures reach the requests."""

from __future__ import annotations

import asyncio
import dataclasses
import pickle

import pytest

from deployments.channel import Address, ChannelError, Inbox, Outbox
from neuron_serve.request import Token, TokenEvent


def token(request_id: str, index: int) -> TokenEvent:
    return TokenEvent(request_id, index, Token(index, f"t{index}", -0.5))


async def take(queue: asyncio.Queue, n: int) -> list[int]:
    """The indexes of the next `n` events, however they were grouped."""
    indexes = []
    while len(indexes) < n:
        indexes += [e.index for e in await asyncio.wait_for(queue.get(), 5)]
    return indexes


def test_one_step_of_events_goes_as_one_frame():
    async def main():
        frames = []

        async def ingress(reader, writer):  # reads the wire as the inbox does
            assert await reader.readexactly(16) == b"s" * 16
            while True:
                length = int.from_bytes(await reader.readexactly(4), "big")
                frames.append(pickle.loads(await reader.readexactly(length)))

        server = await asyncio.start_server(ingress, "127.0.0.1", 0)
        channel = Outbox().channel(Address("127.0.0.1", server.sockets[0].getsockname()[1], b"s" * 16))
        await channel.drain()  # open
        for step in range(3):  # what three engine steps hand over, each for two requests
            channel.send("a", [token("a", step)])
            channel.send("b", [token("b", step)])
            await asyncio.sleep(0)  # the loop turns between steps
        await channel.drain()
        await asyncio.sleep(0.2)
        server.close()
        return frames

    frames = asyncio.run(main())
    assert [{rid: [e.index for e in events] for rid, events in f.items()} for f in frames] == [
        {"a": [step], "b": [step]} for step in range(3)]


def test_the_inbox_routes_each_request_its_own_events():
    async def main():
        inbox = Inbox("127.0.0.1")
        a, b = inbox.open("a"), inbox.open("b")
        channel = Outbox().channel(await inbox.address())
        for step in range(3):
            channel.send("a", [token("a", step)])
            channel.send("b", [token("b", 10 + step)])
            channel.send("gone", [token("gone", step)])  # its caller closed: dropped
            await asyncio.sleep(0)
        await channel.drain()
        got_a, got_b = await take(a, 3), await take(b, 3)
        await inbox.stop()
        return got_a, got_b

    assert asyncio.run(main()) == ([0, 1, 2], [10, 11, 12])


def test_a_connection_without_the_secret_is_refused():
    async def main():
        inbox = Inbox("127.0.0.1")
        queue = inbox.open("a")
        forged = dataclasses.replace(await inbox.address(), secret=b"x" * 16)
        channel = Outbox().channel(forged)
        done = asyncio.get_running_loop().create_future()
        channel.attach("a", done)
        channel.send("a", [token("a", 0)])
        with pytest.raises(ChannelError, match="closed the channel"):
            await asyncio.wait_for(done, 5)
        assert queue.empty()

    asyncio.run(main())


def test_an_unreachable_ingress_fails_the_requests_bound_for_it():
    async def main():
        inbox = Inbox("127.0.0.1")
        address = await inbox.address()
        await inbox.stop()
        await asyncio.sleep(0.1)
        outbox = Outbox()
        channel = outbox.channel(address)
        done = asyncio.get_running_loop().create_future()
        channel.attach("a", done)
        with pytest.raises(ChannelError, match="cannot reach the ingress"):
            await asyncio.wait_for(done, 5)
        with pytest.raises(ChannelError):
            await channel.drain()
        assert outbox.channel(address) is not channel  # the next request tries again

    asyncio.run(main())


def test_an_ingress_that_goes_away_fails_the_requests_waiting_on_it():
    async def main():
        inbox = Inbox("127.0.0.1")
        channel = Outbox().channel(await inbox.address())
        channel.send("a", [token("a", 0)])
        await channel.drain()  # connected
        done = asyncio.get_running_loop().create_future()
        channel.attach("a", done)
        await inbox.stop()
        with pytest.raises(ChannelError, match="closed the channel"):
            await asyncio.wait_for(done, 5)

    asyncio.run(main())


def test_the_address_travels_with_a_request_without_showing_its_secret():
    address = Address("10.0.0.1", 4000, b"s" * 16)
    assert "secret" not in repr(address) and hash(address) == hash(Address("10.0.0.1", 4000, b"s" * 16))
