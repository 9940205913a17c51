"""Tokens from NeuronBatcher replicas to Ingress replicas: one message per engine step, not per request.

Serve's call per request (`NeuronBatcher.generate`) picks the replica, carries cancellation and
reports a lost replica. The events themselves come back over a channel: each ingress replica listens
on a TCP port (its `Inbox`), and each batcher replica keeps one connection to each ingress it serves
(its `Outbox`), on which it writes one frame per engine step holding the events of all that ingress's
requests. TGI's router gets one message per decode step for the whole batch in the same way, and
vLLM's front end one `EngineCoreOutputs`. Each item streamed through Serve costs both processes a
message of their own, so at batch 8 this is 8 times fewer messages on this hop.

A frame is a 4-byte length and a pickled `{request_id: [events]}`. A connection opens with the
ingress's secret, which travels only inside Serve's own calls; the inbox unpickles nothing from a
connection that did not present it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import pickle
import secrets
import socket
from dataclasses import dataclass, field
from typing import Callable

from neuron_serve.request import Event

logger = logging.getLogger("ray.serve")

SECRET_BYTES = 16
LENGTH_BYTES = 4
SECRET_WAIT_S = 5.0  # a connection that has not presented the secret by then is closed
# An ingress whose node vanished (no reset ever comes) is given up this long after it stopped acknowledging
# what was written, or after probes of an idle connection went unanswered, rather than TCP's ~15 minutes,
# while its requests hold their rows and Serve's `max_ongoing_requests` slots here.
PEER_GONE_AFTER_S = 30
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S = 10, 5
# A batcher about to exit waits this long at most for what it sent to leave the process (its ingresses read
# as fast as they can; only one that is gone or stuck holds it).
CLOSE_WAIT_S = 5.0


class ChannelError(ConnectionError):
    """The connection to an ingress could not be opened, or it closed."""


@dataclass(frozen=True)
class Address:
    """Where an ingress replica takes its events: sent along with every request it makes."""

    host: str
    port: int
    secret: bytes = field(repr=False)


class Inbox:
    """An ingress replica's end: a queue per request it waits on, fed by the batchers' frames."""

    def __init__(self, host: str):
        self.host = host
        self.secret = secrets.token_bytes(SECRET_BYTES)
        self._queues: dict[str, asyncio.Queue] = {}
        self._server: asyncio.Server | None = None
        self._starting = asyncio.Lock()
        self._connections: set[asyncio.StreamWriter] = set()

    async def address(self) -> Address:
        """Listens on first use (it needs the replica's event loop)."""
        if self._server is None:
            async with self._starting:
                if self._server is None:
                    self._server = await asyncio.start_server(self._read, self.host, 0)
                    logger.info("Inbox listening on %s:%d", self.host, self.port)
        return Address(self.host, self.port, self.secret)

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    def open(self, request_id: str) -> asyncio.Queue:
        """The queue `request_id`'s event lists will arrive on; `close` it when done."""
        queue = self._queues[request_id] = asyncio.Queue()
        return queue

    def close(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            presented = await asyncio.wait_for(reader.readexactly(SECRET_BYTES), SECRET_WAIT_S)
            if not hmac.compare_digest(presented, self.secret):
                logger.warning("Inbox: refused a connection from %s without the secret",
                               writer.get_extra_info("peername"))
                return
            while True:
                length = int.from_bytes(await reader.readexactly(LENGTH_BYTES), "big")
                frame: dict[str, list[Event]] = pickle.loads(await reader.readexactly(length))
                for request_id, events in frame.items():
                    queue = self._queues.get(request_id)
                    if queue is not None:  # else its caller is gone
                        queue.put_nowait(events)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the batcher went away; its Serve calls report that to their callers
        except asyncio.TimeoutError:
            logger.warning("Inbox: closed a connection from %s that sent no secret in %.0f s",
                           writer.get_extra_info("peername"), SECRET_WAIT_S)
        finally:
            self._connections.discard(writer)
            writer.close()

    async def stop(self) -> None:
        """Stops listening and closes the batchers' connections: their requests here fail."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._connections):
            writer.close()


class Channel:
    """A batcher replica's connection to one ingress: events sent during one step go as one frame."""

    def __init__(self, address: Address, on_closed: Callable[[Channel], None]):
        self.address = address
        self._frame: dict[str, list[Event]] = {}
        self._flush_scheduled = False
        self._writer: asyncio.StreamWriter | None = None
        self._error: ChannelError | None = None
        self._waiting: dict[str, asyncio.Future] = {}  # requests to fail if the connection breaks
        self._on_closed = on_closed
        self._opened = asyncio.ensure_future(self._open())
        self._watching: asyncio.Task | None = None

    def attach(self, request_id: str, done: asyncio.Future) -> None:
        """`done` fails with ChannelError if the connection cannot carry `request_id`'s events."""
        if self._error is not None:
            done.set_exception(self._error)
        else:
            self._waiting[request_id] = done

    def detach(self, request_id: str) -> None:
        self._waiting.pop(request_id, None)

    def send(self, request_id: str, events: list[Event]) -> None:
        """Adds events to the frame of this step."""
        queued = self._frame.get(request_id)
        if queued is None:
            self._frame[request_id] = events
        else:
            queued += events
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def drain(self) -> None:
        """Returns once what was sent is written to the connection; raises ChannelError if it cannot be."""
        await asyncio.shield(self._opened)
        self._flush()
        if self._error is None:
            try:
                await self._writer.drain()
            except OSError as e:  # reset, timed out, unreachable: the connection is gone either way
                self._close(ChannelError(f"the channel to {self._where} broke: {e}"))
        if self._error is not None:
            raise self._error

    async def close(self) -> None:
        """Closes the connection once what was sent has left this process: a batcher that exits while a
        frame is still in its buffer (`drain` returns once the buffer is below its limit, not empty)
        would lose it."""
        await asyncio.shield(self._opened)
        self._flush()
        writer = self._writer
        self._close(ChannelError(f"the channel to {self._where} was closed here"), warn=False)
        if writer is not None:
            try:
                await writer.wait_closed()  # the transport sends what it holds, then closes
            except OSError:
                pass

    @property
    def _where(self) -> str:
        return f"the ingress at {self.address.host}:{self.address.port}"

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._writer is None or not self._frame:
            return  # not open yet: opening flushes what is held; closed: its requests have failed
        data = pickle.dumps(self._frame, protocol=pickle.HIGHEST_PROTOCOL)
        self._frame = {}
        self._writer.write(len(data).to_bytes(LENGTH_BYTES, "big") + data)

    async def _open(self) -> None:
        try:
            reader, writer = await asyncio.open_connection(self.address.host, self.address.port)
        except OSError as e:
            self._close(ChannelError(f"cannot reach {self._where}: {e}"))
            return
        _give_up_on_silence(writer.get_extra_info("socket"))
        writer.write(self.address.secret)
        self._writer = writer
        self._flush()
        self._watching = asyncio.ensure_future(self._watch(reader))

    async def _watch(self, reader: asyncio.StreamReader) -> None:
        """The ingress never writes: anything it does, end of stream included, means it is gone."""
        try:
            await reader.read(1)
        except OSError:  # reset, timed out (a long partition), unreachable: gone as well
            pass
        self._close(ChannelError(f"{self._where} closed the channel"))

    def _close(self, error: ChannelError, warn: bool = True) -> None:
        if self._error is not None:
            return
        self._error = error
        if warn:
            logger.warning("%s", error)
        self._on_closed(self)
        for done in self._waiting.values():
            if not done.done():
                done.set_exception(error)
        self._waiting.clear()
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _give_up_on_silence(sock) -> None:
    """Linux's TCP options (elsewhere, TCP's own timeouts stay)."""
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
                        ("TCP_KEEPCNT", (PEER_GONE_AFTER_S - KEEPALIVE_IDLE_S) // KEEPALIVE_INTERVAL_S),
                        ("TCP_USER_TIMEOUT", PEER_GONE_AFTER_S * 1000)):
        if hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    for level, option, value in options:
        sock.setsockopt(level, option, value)


class Outbox:
    """A batcher replica's channels, one per ingress replica, opened on first use."""

    def __init__(self):
        self._channels: dict[Address, Channel] = {}

    def channel(self, address: Address) -> Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = Channel(address, self._forget)
        return channel

    async def close(self, timeout: float = CLOSE_WAIT_S) -> None:
        """Closes every channel, waiting up to `timeout` for what they were sent to leave this process."""
        closing = [asyncio.ensure_future(channel.close()) for channel in list(self._channels.values())]
        if closing:
            await asyncio.wait(closing, timeout=timeout)

    def _forget(self, channel: Channel) -> None:
        if self._channels.get(channel.address) is channel:
            del self._channels[channel.address]
