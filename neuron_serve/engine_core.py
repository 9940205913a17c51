"""Where the engine's steps run: on a thread of this process, or in a process of its own.

`AsyncEngine` (the asyncio side) drives either core through the same calls: `submit`, `cancel`,
`next_step`, `close`. Each step comes back as one `Step`: that step's events for every request, its
stats and the batch's counts.

- `ThreadCore` steps an `Engine` on the calling thread. The engine benchmark and the tests use it.
- `ProcessCore` runs the engine in a child process (`python -m neuron_serve.engine_core`), as vLLM
  v1 runs its EngineCore and TGI its Python shard. A NeuronBatcher replica uses it: the step loop
  then never waits for the GIL that the replica's serving side (Ray Serve's work for each streamed
  message) holds, and the replica process loads no model. Requests go down a socket pair; one
  message per step comes back. If the child dies, the requests it had fail and the core reports
  itself dead; if the replica dies, the child sees its socket close and exits.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Protocol

from .config import Config, Limits
from .engine import Engine, StepStats
from .request import ErrorEvent, Event, GenerationRequest, is_last

logger = logging.getLogger(__name__)

STOP_WAIT_S = 5.0  # how long `close` waits for the child to exit before killing it


class EngineUnavailable(RuntimeError):
    """The engine process is gone; the request never reached it, so it may be sent elsewhere."""


@dataclass(frozen=True)
class EngineFacts:
    """What the serving side needs to know of an engine it may not hold."""

    limits: Limits
    description: str  # the backend, e.g. "torch (cpu)"
    insertion: str  # the insertion policy's name
    probe_token_id: int  # a prompt of one token for health probes: BOS, else 0

    @classmethod
    def of(cls, engine: Engine) -> EngineFacts:
        bos = engine.tokenizer.bos_token_id
        return cls(engine.limits, engine.backend.description, engine.scheduler.insertion.name, bos or 0)


@dataclass
class Step:
    events: list[Event]
    stats: StepStats | None  # None when the step ran no forward (it only took in or dropped requests)
    active: int  # rows busy after the step
    waiting: int  # requests queued after the step
    failures: int  # failed forwards in a row


def run_step(engine: Engine) -> Step:
    engine.last_step = None
    try:
        events = engine.step()
    except Exception as e:  # a bug outside the forward: fail what is in flight, keep serving
        logger.exception("engine step crashed")
        events = engine.fail_all(e)
    return Step(events, engine.last_step, len(engine.batch.active()), len(engine.waiting), engine.consecutive_failures)


class EngineCore(Protocol):
    facts: EngineFacts

    @property
    def alive(self) -> bool: ...

    def submit(self, request: GenerationRequest) -> None: ...

    def cancel(self, request_id: str) -> None: ...

    def arm_fault(self, kind: str, times: int) -> None: ...

    def next_step(self, timeout: float) -> Step | None:
        """The next step's result, or None when there was none within `timeout` seconds."""

    def close(self) -> None: ...


class ThreadCore:
    """The engine steps on the thread that calls `next_step`."""

    alive = True

    def __init__(self, engine: Engine):
        self.engine = engine
        self.facts = EngineFacts.of(engine)
        self._wake = threading.Event()

    def submit(self, request: GenerationRequest) -> None:
        self.engine.submit(request)
        self._wake.set()

    def cancel(self, request_id: str) -> None:
        self.engine.cancel(request_id)
        self._wake.set()

    def arm_fault(self, kind: str, times: int) -> None:
        self.engine.backend.arm(kind, times)  # a FaultInjectingBackend (`fault_injection: true`)

    def next_step(self, timeout: float) -> Step | None:
        if not self.engine.has_work:
            self._wake.wait(timeout)
            self._wake.clear()
            return None
        return run_step(self.engine)

    def close(self) -> None:
        self._wake.set()


class ProcessCore:
    """The engine in a child process. The constructor blocks until the model is loaded."""

    def __init__(self, config: Config):
        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._process = subprocess.Popen(
            [sys.executable, "-m", "neuron_serve.engine_core", str(theirs.fileno())], pass_fds=[theirs.fileno()], env=env
        )
        theirs.close()
        self._conn = Connection(ours.detach())
        self._lock = threading.Lock()  # one sender at a time; guards `_open`
        self._open: set[str] = set()  # requests the child holds and has not finished
        self._alive = True
        self._conn.send(config)
        try:
            reply, detail = self._conn.recv()
        except (EOFError, OSError):
            reply, detail = "failed", f"the engine process exited with code {self._process.wait()}"
        if reply != "ready":
            self.close()
            raise RuntimeError(f"the engine process failed to start: {detail}")
        self.facts: EngineFacts = detail

    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def pid(self) -> int:
        return self._process.pid

    def _send(self, *message) -> None:
        with self._lock:
            if message[0] == "submit":
                self._open.add(message[1].id)
            elif message[0] == "cancel":
                self._open.discard(message[1])
            self._conn.send(message)

    def submit(self, request: GenerationRequest) -> None:
        if not self._alive:
            raise EngineUnavailable("the engine process is gone")
        self._send("submit", request)

    def cancel(self, request_id: str) -> None:
        if self._alive:
            self._send("cancel", request_id)

    def arm_fault(self, kind: str, times: int) -> None:
        self._send("arm", (kind, times))

    def next_step(self, timeout: float) -> Step | None:
        if not self._alive:
            return None
        try:
            if not self._conn.poll(timeout):
                return None
            step: Step = self._conn.recv()
        except (EOFError, OSError):
            return self._died()
        finished = [e.request_id for e in step.events if is_last(e)]
        if finished:
            with self._lock:
                self._open.difference_update(finished)
        return step

    def _died(self) -> Step:
        """The child is gone: fail what it held, once."""
        self._alive = False
        code = self._process.wait()
        logger.error("the engine process exited with code %s", code)
        with self._lock:
            lost, self._open = self._open, set()
        message = f"Request failed: the engine process exited (code {code})"
        return Step([ErrorEvent(request_id, message) for request_id in lost], None, 0, 0, 0)

    def close(self) -> None:
        if self._process.poll() is None:
            try:
                self._conn.send(("stop", None))
                self._process.wait(STOP_WAIT_S)
            except (OSError, subprocess.TimeoutExpired):
                self._process.kill()
                self._process.wait()
        self._alive = False
        self._conn.close()


# -- the child process -----------------------------------------------------------------------------


def _serve(conn: Connection) -> None:
    config: Config = conn.recv()
    commands: queue.SimpleQueue = queue.SimpleQueue()

    def read() -> None:  # from the start, so that a replica that goes away mid-load takes this process with it
        try:
            while True:
                commands.put(conn.recv())
        except (EOFError, OSError):
            os._exit(0)

    threading.Thread(target=read, name="engine-commands", daemon=True).start()
    try:
        from .loading import build_engine, limit_torch_threads

        limit_torch_threads(config)
        engine = build_engine(config)
    except BaseException as e:  # the replica shows this message as its startup error
        logger.exception("engine failed to load")
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", EngineFacts.of(engine)))
    while True:
        block = not engine.has_work  # nothing to step: sleep until told something
        while True:
            try:
                kind, argument = commands.get(block=block)
            except queue.Empty:
                break
            block = False
            if kind == "stop":
                return
            if kind == "submit":
                engine.submit(argument)
            elif kind == "cancel":
                engine.cancel(argument)
            elif kind == "arm" and hasattr(engine.backend, "arm"):  # only with `fault_injection: true`
                engine.backend.arm(*argument)
        if engine.has_work:
            conn.send(run_step(engine))


if __name__ == "__main__":
    from neuron_serve import engine_core  # so that what goes back pickles as neuron_serve.engine_core.Step, not __main__.Step

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s engine[%(process)d] %(name)s: %(message)s")
    engine_core._serve(Connection(int(sys.argv[1])))
