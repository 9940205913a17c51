"""The asyncio side of an engine core: callers await their request's events, a thread waits for steps.

`generate(request)` is an async iterator of event lists for one request. The core (a thread of this
process or a process of its own, see engine_core.py) produces one `Step` at a time; a thread here
takes each and hands it to the event loop in one call. A caller that falls behind gets the events
that piled up as one list, so a slow consumer costs one hand-over, not one per token. With
`stream_interval` N > 1, a request's tokens after its first are handed over N at a time (its first
token and its last event go at once): each hand-over is a message between processes in Ray Serve,
so on a busy host fewer of them buy throughput, at the price of tokens arriving in bursts. A caller
that stops iterating (client disconnect, task cancellation) cancels its request in the engine,
which frees its row at the next step. A bug in a step fails the requests in flight and the loop
keeps going.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import AsyncIterator, Callable

from .engine import StepStats
from .engine_core import EngineCore, Step
from .request import Event, GenerationRequest, TokenEvent, is_last

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 1.0  # the step thread checks for `stop` this often when there is no work
BROKEN_AFTER_FAILURES = 3  # failed forwards in a row after which the engine reports itself unhealthy


class AsyncEngine:
    def __init__(self, core: EngineCore, on_step: Callable[[StepStats], None] | None = None, stream_interval: int = 1,
                 on_core_lost: Callable[[], None] | None = None):
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {stream_interval}")
        self.core = core
        self.on_step = on_step  # called on the event loop after each step that ran a forward (for metrics)
        self.on_core_lost = on_core_lost  # called on the event loop once, after the core's last step, if it died
        self.stream_interval = stream_interval
        self.active = 0  # rows busy after the latest step
        self.waiting = 0  # requests queued after the latest step
        self._failures = 0  # failed forwards in a row, as of the latest step
        self._streams: dict[str, asyncio.Queue[list[Event]]] = {}
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
        self.core.close()  # wakes the step thread
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    @property
    def healthy(self) -> bool:
        """The step loop and its core run, and the backend has not failed its last few forwards in a row."""
        alive = self._thread is not None and self._thread.is_alive() and self.core.alive
        return alive and self._failures < BROKEN_AFTER_FAILURES

    async def generate(self, request: GenerationRequest) -> AsyncIterator[list[Event]]:
        if self._thread is None:
            self.start()
        if request.id in self._streams:
            raise ValueError(f"request id {request.id} is already in flight")
        queue: asyncio.Queue[list[Event]] = asyncio.Queue()
        self._streams[request.id] = queue
        try:
            self.core.submit(request)
        except BaseException:
            del self._streams[request.id]
            raise
        finished = False
        pending: list[Event] = []
        handed_over = 0  # token events handed over so far
        try:
            while not finished:
                pending.extend(await queue.get())
                while not queue.empty():
                    pending.extend(queue.get_nowait())
                finished = is_last(pending[-1])
                tokens = sum(isinstance(e, TokenEvent) for e in pending)
                if finished or handed_over == 0 or tokens >= self.stream_interval:
                    handed_over += tokens
                    events, pending = pending, []
                    yield events
        finally:
            del self._streams[request.id]
            if not finished:
                self.core.cancel(request.id)

    # -- the step thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            step = self.core.next_step(IDLE_WAIT_S)
            if self._stopping.is_set():
                return
            if step is not None:
                self._loop.call_soon_threadsafe(self._dispatch, step)
            if not self.core.alive:  # it died: its requests have just failed, and there will be no more steps
                if self.on_core_lost is not None:
                    self._loop.call_soon_threadsafe(self.on_core_lost)
                return

    def _dispatch(self, step: Step) -> None:
        self.active, self.waiting, self._failures = step.active, step.waiting, step.failures
        if step.stats is not None and self.on_step is not None:
            try:
                self.on_step(step.stats)
            except Exception:
                logger.exception("on_step callback failed")
        for event in step.events:
            queue = self._streams.get(event.request_id)
            if queue is not None:  # else its caller is gone
                queue.put_nowait([event])
