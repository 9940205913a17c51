"""The channel from batcher to ingress: one frame per step, only with the secret, failures reach the requests."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time

import pytest

from deployments import channel as channel_module
from deployments.channel import Address, ChannelError, Inbox, Outbox
from neuron_serve.request import (
    Finish, FinishReason, GenerationRequest, SamplingParams, StoppingParams, Token, TokenEvent,
)


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


def test_closing_waits_until_what_was_sent_has_left_the_process():
    """A batcher closes its channels as it exits, after its last requests returned: `drain` returned once their
    frames were below the write buffer's limit, and what is still buffered would be lost with the process."""
    async def main():
        payload = b"x" * (64 << 20)  # more than the sockets' buffers hold
        read_all, reading = asyncio.Event(), asyncio.Event()
        received = 0

        async def slow_ingress(reader, writer):
            nonlocal received
            await reader.readexactly(16)
            await reading.wait()
            while chunk := await reader.read(1 << 20):
                received += len(chunk)
            read_all.set()

        server = await asyncio.start_server(slow_ingress, "127.0.0.1", 0)
        outbox = Outbox()
        channel = outbox.channel(Address("127.0.0.1", server.sockets[0].getsockname()[1], b"s" * 16))
        await channel.drain()  # open
        channel.send("a", [payload])
        await asyncio.sleep(0)  # the frame goes to the transport
        closing = asyncio.ensure_future(outbox.close(timeout=30))
        await asyncio.sleep(0.3)
        assert not closing.done()  # the ingress has not read it yet
        reading.set()
        await asyncio.wait_for(closing, 30)
        await asyncio.wait_for(read_all.wait(), 30)
        server.close()
        return received, 4 + len(pickle.dumps({"a": [payload]}, protocol=pickle.HIGHEST_PROTOCOL))

    received, sent = asyncio.run(main())
    assert received == sent


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


def test_a_channel_gives_up_on_an_ingress_that_stops_answering():
    """TCP's own timeouts hold a connection to a vanished host about 15 minutes while data waits, and for
    ever while idle: the channel's connection is given PEER_GONE_AFTER_S instead."""
    async def main():
        inbox = Inbox("127.0.0.1")
        channel = Outbox().channel(await inbox.address())
        await channel.drain()  # open
        sock = channel._writer.get_extra_info("socket")
        options = {name: sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, name))
                   for name in ("TCP_USER_TIMEOUT", "TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT")}
        keepalive = sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        await inbox.stop()
        return keepalive, options

    keepalive, options = asyncio.run(main())
    gone = channel_module.PEER_GONE_AFTER_S
    assert keepalive and options["TCP_USER_TIMEOUT"] == gone * 1000
    assert options["TCP_KEEPIDLE"] + options["TCP_KEEPINTVL"] * options["TCP_KEEPCNT"] <= gone


PEER_INBOX = """
import asyncio, sys
sys.path.insert(0, sys.argv[2])
from deployments.channel import Inbox
async def main():
    inbox = Inbox(sys.argv[1])
    address = await inbox.address()
    queue = inbox.open("a")
    print(address.port, address.secret.hex(), flush=True)
    while True:
        await queue.get()
        print("frame", flush=True)
asyncio.run(main())
"""


@pytest.mark.skipif(not (sys.platform == "linux" and os.geteuid() == 0 and shutil.which("ip")),
                    reason="a host that vanishes is a network namespace whose link goes down: root and iproute2")
def test_an_ingress_whose_host_vanishes_fails_its_requests_in_time(monkeypatch):
    """No reset comes from a host that is gone (a node lost, a partition): the channels to its ingress,
    one writing tokens and one idle, fail their requests within PEER_GONE_AFTER_S, so that their rows free."""
    monkeypatch.setattr(channel_module, "PEER_GONE_AFTER_S", 3)
    monkeypatch.setattr(channel_module, "KEEPALIVE_IDLE_S", 1)
    monkeypatch.setattr(channel_module, "KEEPALIVE_INTERVAL_S", 1)
    n = os.getpid() % 200
    ns, host_if, peer_if, host_ip, peer_ip = f"nstest{n}", f"vh{n}", f"vp{n}", f"10.213.{n}.1", f"10.213.{n}.2"
    ip = lambda *args: subprocess.run(["ip", *args], check=True, capture_output=True)  # noqa: E731
    peer = None
    try:
        try:
            ip("netns", "add", ns)
            ip("link", "add", host_if, "type", "veth", "peer", "name", peer_if)
            ip("link", "set", peer_if, "netns", ns)
            ip("addr", "add", f"{host_ip}/24", "dev", host_if)
            ip("link", "set", host_if, "up")
            ip("netns", "exec", ns, "ip", "addr", "add", f"{peer_ip}/24", "dev", peer_if)
            ip("netns", "exec", ns, "ip", "link", "set", peer_if, "up")
        except subprocess.CalledProcessError as e:
            pytest.skip(f"no network namespace with a veth pair here: {e.stderr.decode().strip()}")
        root = str(channel_module.__file__).rsplit("/deployments/", 1)[0]
        peer = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", PEER_INBOX, peer_ip, root],
                                stdout=subprocess.PIPE, text=True)
        port, secret = peer.stdout.readline().split()
        address = Address(peer_ip, int(port), bytes.fromhex(secret))

        async def main():
            writing, idle = Outbox().channel(address), Outbox().channel(address)  # two batchers
            loop = asyncio.get_running_loop()
            done = {"writing": loop.create_future(), "idle": loop.create_future()}
            writing.attach("a", done["writing"])
            idle.attach("a", done["idle"])
            for channel in (writing, idle):
                channel.send("a", [token("a", 0)])
                await channel.drain()
            assert [await asyncio.to_thread(peer.stdout.readline) for _ in range(2)] == ["frame\n"] * 2
            ip("netns", "exec", ns, "ip", "link", "set", peer_if, "down")  # the host is gone: nothing answers
            gone_at, failed_after = time.monotonic(), {}
            for index in range(1, 400):
                if all(f.done() for f in done.values()):
                    break
                writing.send("a", [token("a", index)])  # a token each step
                await asyncio.sleep(0.05)
                for name, future in done.items():
                    if future.done() and name not in failed_after:
                        failed_after[name] = time.monotonic() - gone_at
            for future in done.values():
                with pytest.raises(ChannelError):
                    future.result()
            return failed_after

        failed_after = asyncio.run(main())
        assert set(failed_after) == {"writing", "idle"}
        assert max(failed_after.values()) < 3 + 2, failed_after
    finally:
        if peer is not None:
            peer.kill()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # and the veth pair with it
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)


def test_the_address_travels_with_a_request_without_showing_its_secret():
    address = Address("10.0.0.1", 4000, b"s" * 16)
    assert "secret" not in repr(address) and hash(address) == hash(Address("10.0.0.1", 4000, b"s" * 16))


class _Response:
    """What a Serve handle's call returns, enough for the ingress: awaitable, cancellable."""

    def __init__(self, coroutine):
        self._task = asyncio.ensure_future(coroutine)

    def __await__(self):
        return self._task.__await__()

    def cancel(self):
        self._task.cancel()


class _UnreachableThenServed:
    """A handle whose first call reports its replica unreachable, while that replica, alive, goes on
    sending the request's events; the next call is served by another replica."""

    def __init__(self):
        self.generate = self
        self.ids: list[str] = []
        self.stale: asyncio.Task | None = None

    def remote(self, request, reply_to):
        self.ids.append(request.id)
        return _Response(self._unreachable(request, reply_to) if len(self.ids) == 1 else self._served(request, reply_to))

    async def _unreachable(self, request, reply_to):
        from ray.exceptions import ActorUnavailableError

        async def go_on():  # the first replica's step loop did not hear of the failed call
            channel = Outbox().channel(reply_to)
            for index in range(100, 103):
                await asyncio.sleep(0.05)
                channel.send(request.id, [token(request.id, index)])
            await channel.drain()

        self.stale = asyncio.ensure_future(go_on())
        raise ActorUnavailableError("injected: the replica cannot be reached", None)

    async def _served(self, request, reply_to):
        channel = Outbox().channel(reply_to)
        await asyncio.sleep(0.3)  # after every stale event came
        channel.send(request.id, [token(request.id, 1), token(request.id, 2)])
        last = token(request.id, 3)
        last.finish = Finish(FinishReason.LENGTH, "", 3, None, 0.0, 0.0)
        channel.send(request.id, [last])
        await channel.drain()


def test_a_request_sent_again_hears_only_its_new_replica():
    """An unreachable replica may not be dead: a resend goes under an id of its own, so the first
    replica's events cannot mix into the answer."""
    from deployments.ingress import BatcherSource

    async def main():
        inbox = Inbox("127.0.0.1")
        handle = _UnreachableThenServed()

        async def not_deleting():
            return False

        source = BatcherSource(handle, inbox, not_deleting)
        request = GenerationRequest("r", (1, 2), SamplingParams(), StoppingParams(3))
        got = [[e.index for e in events] async for events in source.stream(request)]
        await handle.stale
        await inbox.stop()
        return handle.ids, got

    ids, got = asyncio.run(main())
    assert [i for events in got for i in events] == [1, 2, 3]
    assert ids == ["r", "r.2"]


def test_a_connection_that_sends_no_secret_is_closed(monkeypatch):
    """A port scan or a stalled peer holds no task or descriptor of the ingress for long."""
    from deployments import channel

    monkeypatch.setattr(channel, "SECRET_WAIT_S", 0.2)

    async def main():
        inbox = Inbox("127.0.0.1")
        address = await inbox.address()
        reader, writer = await asyncio.open_connection(address.host, address.port)
        closed = await asyncio.wait_for(reader.read(1), 5)  # end of stream: the inbox hung up
        writer.close()
        await inbox.stop()
        return closed

    assert asyncio.run(main()) == b""


class _Held:
    """A handle whose replica holds the request (queued for a row) and says so, then streams it."""

    def __init__(self, in_hand: bool, first_token_s: float):
        self.generate = self
        self.in_hand, self.first_token_s = in_hand, first_token_s

    def remote(self, request, reply_to):
        return _Response(self._serve(request, reply_to))

    async def _serve(self, request, reply_to):
        channel = Outbox().channel(reply_to)
        if self.in_hand:
            await asyncio.sleep(0.5)
            channel.send(request.id, [])  # what NeuronBatcher.generate sends after IN_HAND_AFTER_S
        await asyncio.sleep(self.first_token_s)
        last = token(request.id, 1)
        last.finish = Finish(FinishReason.LENGTH, "", 1, None, 0.0, 0.0)
        channel.send(request.id, [last])
        await channel.drain()


def _stream_while(handle, app_deleting) -> list:
    from deployments.ingress import BatcherSource

    async def main():
        inbox = Inbox("127.0.0.1")
        source = BatcherSource(handle, inbox, app_deleting)
        request = GenerationRequest("r", (1, 2), SamplingParams(), StoppingParams(1))
        got = [events async for events in source.stream(request)]
        await inbox.stop()
        return got

    return asyncio.run(main())


async def _deleting():
    return True


async def _controller_not_answering():
    await asyncio.sleep(3600)


def test_a_request_a_batcher_holds_finishes_while_its_app_is_deleted():
    """A graceful deletion lets the batchers finish what they hold, first token or not."""
    [[event]] = _stream_while(_Held(in_hand=True, first_token_s=2.5), _deleting)
    assert isinstance(event, TokenEvent) and event.finish is not None


def test_a_request_no_batcher_holds_is_refused_while_its_app_is_deleted():
    """Serve would hold it until this replica is killed: it gets TGI's 503 `unhealthy` instead."""
    [[event]] = _stream_while(_Held(in_hand=False, first_token_s=60), _deleting)
    assert event.error_type == "unhealthy"


def test_a_controller_that_does_not_answer_holds_back_no_token():
    """Asking whether the app is being deleted never delays a token that came meanwhile."""
    [[event]] = _stream_while(_Held(in_hand=False, first_token_s=1.5), _controller_not_answering)
    assert isinstance(event, TokenEvent) and event.finish is not None
