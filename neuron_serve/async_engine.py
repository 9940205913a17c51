"""The engine's step loop on a background thread, with asyncio callers on the other side.

`generate(request)` is an async iterator of event lists for one request. The step thread hands each
step's events to the event loop in one call; a caller that falls behind gets the events that piled
up as one list, so a slow consumer costs one hand-over, not one per token. With `stream_interval`
N > 1, a request's tokens after its first are handed over N at a time (its first token and its last
event go at once): each hand-over is a message between processes in Ray Serve, so on a busy host
fewer of them buy throughput, at the price of tokens arriving in bursts. A caller that stops
iterating (client disconnect, task cancellation) cancels its request in the engine, which frees its
row at the next step. A bug in a step fails the requests in flight and the loop keeps going.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import AsyncIterator, Callable

from .engine import Engine, StepStats
from .request import Event, GenerationRequest, TokenEvent, is_last

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 1.0  # the step thread sleeps this long at most when there is no work
BROKEN_AFTER_FAILURES = 3  # failed forwards in a row after which the engine reports itself unhealthy


class AsyncEngine:
    def __init__(self, engine: Engine, on_step: Callable[[StepStats], None] | None = None, stream_interval: int = 1):
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {stream_interval}")
        self.engine = engine
        self.on_step = on_step  # called on the event loop after each step (for metrics)
        self.stream_interval = stream_interval
        self._streams: dict[str, asyncio.Queue[list[Event]]] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the step thread; call from the event loop the callers run on."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine-step-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    @property
    def healthy(self) -> bool:
        """The step loop runs, and the backend has not failed its last few forwards in a row."""
        alive = self._thread is not None and self._thread.is_alive()
        return alive and self.engine.consecutive_failures < BROKEN_AFTER_FAILURES

    async def generate(self, request: GenerationRequest) -> AsyncIterator[list[Event]]:
        if self._thread is None:
            self.start()
        if request.id in self._streams:
            raise ValueError(f"request id {request.id} is already in flight")
        queue: asyncio.Queue[list[Event]] = asyncio.Queue()
        self._streams[request.id] = queue
        self.engine.submit(request)
        self._wake.set()
        finished = False
        pending: list[Event] = []
        first_handed_over = False  # the first token goes at once, whatever `stream_interval`
        try:
            while not finished:
                pending.extend(await queue.get())
                while not queue.empty():
                    pending.extend(queue.get_nowait())
                finished = is_last(pending[-1])
                tokens = sum(isinstance(e, TokenEvent) for e in pending)
                if finished or not first_handed_over or tokens >= self.stream_interval:
                    first_handed_over = first_handed_over or tokens > 0
                    events, pending = pending, []
                    yield events
        finally:
            del self._streams[request.id]
            if not finished:
                self.engine.cancel(request.id)
                self._wake.set()

    # -- the step thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            if not self.engine.has_work:
                self._wake.wait(IDLE_WAIT_S)
                self._wake.clear()
                continue
            self.engine.last_step = None
            try:
                events = self.engine.step()
            except Exception as e:  # a bug outside the forward: fail what is in flight, keep serving
                logger.exception("engine step crashed")
                events = self.engine.fail_all(e)
            if events or self.engine.last_step:
                self._loop.call_soon_threadsafe(self._dispatch, events, self.engine.last_step)

    def _dispatch(self, events: list[Event], stats: StepStats | None) -> None:
        if stats is not None and self.on_step is not None:
            try:
                self.on_step(stats)
            except Exception:
                logger.exception("on_step callback failed")
        for event in events:
            queue = self._streams.get(event.request_id)
            if queue is not None:  # else its caller is gone
                queue.put_nowait([event])
