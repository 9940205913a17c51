"""The engine's step loop on a background thread, with asyncio callers on the other side.

`open(request, deliver)` submits a request: `deliver` gets its events on the event loop, one call per
step that made any, and the returned future resolves with its last event. `generate(request)` wraps
that as an async iterator of event lists; a caller that falls behind gets the events that piled up
as one list, so a slow consumer costs one hand-over, not one per token. With `stream_interval` N > 1,
a request's tokens after its first are handed over N at a time (its first token and its last event
go at once): on a busy host fewer hand-overs buy throughput, at the price of tokens arriving in
bursts. A caller that stops iterating (client disconnect, task cancellation) cancels its request in
the engine, which frees its row at the next step. A bug in a step fails the requests in flight and
the loop keeps going. A step, or the work between steps, that runs past `step_timeout_s` (a stalled
Neuron runtime, a hung metrics call) makes the engine unhealthy; Ray Serve's health check then replaces
the replica.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import AsyncIterator, Callable

from .engine import Engine, StepStats
from .request import Event, GenerationRequest, TokenEvent, is_last

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 1.0  # the step thread sleeps this long at most when there is no work
BROKEN_AFTER_FAILURES = 3  # failed forwards in a row after which the engine reports itself unhealthy

Deliver = Callable[[list[Event]], None]


class Stream:
    """One request's events on their way to its `deliver`, grouped by `stream_interval`."""

    __slots__ = ("deliver", "interval", "done", "pending", "tokens", "started")

    def __init__(self, deliver: Deliver, interval: int, done: asyncio.Future[Event]):
        self.deliver, self.interval, self.done = deliver, interval, done
        self.pending: list[Event] = []
        self.tokens = 0  # tokens in `pending`
        self.started = False  # its first token went: the first goes at once, whatever the interval

    def add(self, event: Event) -> bool:
        """Takes one event; True when it was the request's last."""
        self.pending.append(event)
        self.tokens += isinstance(event, TokenEvent)
        last = is_last(event)
        if last or not self.started or self.tokens >= self.interval:
            self.started = self.started or self.tokens > 0
            events, self.pending, self.tokens = self.pending, [], 0
            self.deliver(events)
        if last and not self.done.done():
            self.done.set_result(event)
        return last


class AsyncEngine:
    def __init__(self, engine: Engine, on_step: Callable[[StepStats], None] | None = None, stream_interval: int = 1,
                 step_timeout_s: float = float("inf"), between_steps: Callable[[], None] | None = None):
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {stream_interval}")
        self.engine = engine
        self.on_step = on_step  # called on the event loop after each step's deliveries (for metrics)
        # Called on the step thread after each step, before its events go to the event loop, and while idle:
        # once the last step's `on_step` has run, and at least every IDLE_WAIT_S. Work that should not take
        # the GIL from the step thread while it computes (the event loop is idle then).
        self.between_steps = between_steps
        self.stream_interval = stream_interval
        self.step_timeout_s = step_timeout_s
        self._busy_since: float | None = None  # while a step, or `between_steps`, runs
        self._streams: dict[str, Stream] = {}
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
        """The step loop runs, no step (nor `between_steps`) has run past `step_timeout_s`, and the backend
        has not failed its last few forwards in a row."""
        alive = self._thread is not None and self._thread.is_alive()
        started = self._busy_since
        stalled = started is not None and time.monotonic() - started > self.step_timeout_s
        return alive and not stalled and self.engine.consecutive_failures < BROKEN_AFTER_FAILURES

    def open(self, request: GenerationRequest, deliver: Deliver) -> asyncio.Future[Event]:
        """Submits `request`; `deliver` gets its events on the event loop. The future resolves with its
        last event; `cancel(request.id)` stops it before that. Ids are never reused: events are matched to
        their request by id, and a step that ran before a cancel may still hand over the old request's."""
        if self._thread is None:
            self.start()
        if request.id in self._streams:
            raise ValueError(f"request id {request.id} is already in flight")
        done = self._loop.create_future()
        self._streams[request.id] = Stream(deliver, self.stream_interval, done)
        self.engine.submit(request)
        self._wake.set()
        return done

    def cancel(self, request_id: str) -> None:
        """Frees the request's row at the next step; nothing once its last event went."""
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.done.cancel()
            self.engine.cancel(request_id)
            self._wake.set()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[list[Event]]:
        queue: asyncio.Queue[list[Event]] = asyncio.Queue()
        self.open(request, queue.put_nowait)
        try:
            while True:
                events = await queue.get()
                while not queue.empty():
                    events += queue.get_nowait()
                yield events
                if is_last(events[-1]):
                    return
        finally:
            self.cancel(request.id)

    # -- the step thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            if not self.engine.has_work:
                self._run_between_steps()
                self._wake.wait(IDLE_WAIT_S)
                self._wake.clear()
                continue
            self.engine.last_step = None
            self._busy_since = time.monotonic()
            try:
                events = self.engine.step()
            except Exception as e:  # a bug before the step's plan: fail what is in flight, keep serving
                logger.exception("engine step crashed")
                events = self.engine.fail_all(e)
            finally:
                self._busy_since = None
            self._run_between_steps()
            if events or self.engine.last_step:
                self._loop.call_soon_threadsafe(self._dispatch, events, self.engine.last_step)
        self._run_between_steps()  # what was left for it

    def _run_between_steps(self) -> None:
        if self.between_steps is not None:
            self._busy_since = time.monotonic()
            try:
                self.between_steps()
            except Exception:  # its own failure; the steps go on
                logger.exception("between_steps failed")
            finally:
                self._busy_since = None

    def _dispatch(self, events: list[Event], stats: StepStats | None) -> None:
        started = time.perf_counter()
        for event in events:
            stream = self._streams.get(event.request_id)
            if stream is None:  # its caller is gone
                continue
            try:
                if stream.add(event):
                    del self._streams[event.request_id]
            except Exception as e:  # a failing `deliver` ends its own request, not the others
                logger.exception("delivering request %s's events failed", event.request_id)
                if not stream.done.done():
                    stream.done.set_exception(e)
                self.cancel(event.request_id)
        if stats is not None and self.on_step is not None:
            stats.filter_s = time.perf_counter() - started
            # Behind whatever the deliveries scheduled (the loop runs its callbacks in order), so that
            # the step's tokens go out before its metrics are recorded.
            self._loop.call_soon(self._record, stats)

    def _record(self, stats: StepStats) -> None:
        try:
            self.on_step(stats)
        except Exception:
            logger.exception("on_step callback failed")
        if not self.engine.has_work:
            # The step thread has nothing to do: it runs `between_steps` for what `on_step` queued now, not in
            # front of the next request's first token.
            self._wake.set()
