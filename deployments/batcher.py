"""NeuronBatcher: one replica, one engine, one static batch, pinned to its NeuronCore group.

Ray gives each replica the `neuron_cores` it asked for and sets `NEURON_RT_VISIBLE_CORES` before the
constructor runs; the engine runs in a child process of the replica (engine_core.ProcessCore), which
inherits it, so the Neuron runtime there sees only this group. Requests stream back as lists of
events (one list per hand-over, not one call per token). When the caller goes away, Serve cancels
`generate`, and the engine frees the row. If the engine process dies, its requests fail and the
health check fails, so Serve replaces the replica.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from typing import Any, AsyncIterator

from ray import serve

from neuron_serve.async_engine import AsyncEngine
from neuron_serve.config import Config
from neuron_serve.engine_core import ProcessCore
from neuron_serve.request import ErrorEvent, Event, GenerationRequest, SamplingParams, StoppingParams, TokenEvent

from .metrics import BatcherMetrics

logger = logging.getLogger("ray.serve")

RECENT_TOKEN_S = 10.0  # a replica that produced a token this recently is healthy without a probe


class NeuronBatcher:
    async def __init__(self, config: Config):
        context = serve.get_replica_context()
        self.replica = context.replica_tag
        self.cores = os.environ.get("NEURON_RT_VISIBLE_CORES") or ""
        self.config = config
        logger.info("NeuronBatcher %s: NeuronCores [%s], loading %s (backend %s)",
                    self.replica, self.cores or "none", config.model_id, config.backend)
        started = time.monotonic()
        # Minutes for a compiled model on inf2: off the event loop, bounded by the configured timeout.
        core = await asyncio.wait_for(asyncio.to_thread(ProcessCore, config), timeout=config.startup_timeout_s)
        self.facts = core.facts
        self.metrics = BatcherMetrics(self.facts.limits, self.cores or "none", self.facts.insertion)
        self.engine = AsyncEngine(core, on_step=self._on_step, stream_interval=config.stream_interval,
                                  on_core_lost=self._engine_lost)
        self.engine.start()
        self.last_token_at = 0.0
        self.served = 0  # requests this replica has taken
        logger.info("NeuronBatcher %s ready in %.1fs: %s, %d rows", self.replica, time.monotonic() - started,
                    self.facts.description, self.facts.limits.max_batch_size)

    def _on_step(self, stats) -> None:
        self.metrics.record(stats)
        if not stats.failed:
            self.last_token_at = time.monotonic()

    def _engine_lost(self) -> None:
        """The engine process is part of this replica: without it the replica exits at once, so that
        its streams end as a dead replica's do (one error event each), Serve's router stops sending
        here (requests with no token yet go to another replica) and Serve starts a new replica."""
        logger.error("NeuronBatcher %s: its engine process died; the replica exits so that Serve replaces it",
                     self.replica)
        logging.shutdown()
        os._exit(1)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[list[Event]]:
        self.served += 1
        generated = 0
        last: Event | None = None
        handed_over = time.monotonic()  # when it arrived, then when its latest tokens came
        try:
            async for events in self.engine.generate(request):
                tokens = sum(isinstance(e, TokenEvent) for e in events)
                if tokens:
                    now = time.monotonic()
                    self.metrics.delivered(now - handed_over, tokens, first=generated == 0)
                    handed_over = now
                generated += tokens
                last = events[-1]
                yield events
        finally:
            self._log_request(request, generated, last)

    def _log_request(self, request: GenerationRequest, generated: int, last: Event | None) -> None:
        """One structured line per request (never its text); Serve adds the HTTP request id."""
        fields = (f"replica={self.replica} cores={self.cores or 'none'} input_tokens={len(request.input_ids)} "
                  f"output_tokens={generated}")
        if isinstance(last, TokenEvent) and last.finish is not None:
            f = last.finish
            logger.info("request done: %s finish=%s queue_ms=%.1f inference_ms=%.1f", fields, f.reason.value,
                        f.queue_time * 1000, f.inference_time * 1000)
        elif isinstance(last, ErrorEvent):
            logger.info("request failed: %s error=%r", fields, last.message)
        else:
            logger.info("request cancelled: %s", fields)

    async def probe(self) -> bool:
        """True when this replica can produce a token: it just did, or it does one now."""
        if not self.engine.healthy:
            return False
        if time.monotonic() - self.last_token_at < RECENT_TOKEN_S:
            return True
        probe = GenerationRequest(f"probe-{uuid.uuid4().hex}", (self.facts.probe_token_id,), SamplingParams(),
                                  StoppingParams(1))
        async for events in self.engine.generate(probe):
            return isinstance(events[-1], TokenEvent)
        return False

    async def status(self) -> dict[str, Any]:
        return {
            "replica": self.replica,
            "neuron_cores": self.cores or None,
            "engine_pid": self.engine.core.pid,
            "backend": self.facts.description,
            "insertion": self.facts.insertion,
            "stream_interval": self.engine.stream_interval,
            "batch_size": self.facts.limits.max_batch_size,
            "active": self.engine.active,
            "waiting": self.engine.waiting,
            "served": self.served,
            "healthy": self.engine.healthy,
        }

    async def inject_fault(self, kind: str, times: int) -> None:
        """Tests only (`fault_injection: true`): the next `times` forwards of `kind` fail in the backend."""
        if not self.config.fault_injection:
            raise PermissionError("fault injection is off on this replica (`fault_injection: false`)")
        self.engine.core.arm_fault(kind, times)

    async def check_health(self) -> None:
        """Ray Serve's health check: a replica whose step loop died or whose backend keeps failing is restarted."""
        if not self.engine.healthy:
            raise RuntimeError(f"NeuronBatcher {self.replica} is unhealthy: the engine's backend keeps failing")

    async def __del__(self) -> None:
        if hasattr(self, "engine"):
            self.engine.stop()
