"""NeuronBatcher: one replica, one engine, one static batch, pinned to its NeuronCore group.

Ray gives each replica the `neuron_cores` it asked for and sets `NEURON_RT_VISIBLE_CORES` before the
constructor runs, so the Neuron runtime in this process sees only its group. The engine steps on
its own thread; each request's events go back to its ingress replica over that replica's channel
(`channel.py`), one frame per step for all of its requests. When the caller goes away, Serve cancels
`generate`, and the engine frees the row.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from typing import Any

from ray import serve

from neuron_serve.async_engine import AsyncEngine
from neuron_serve.config import Config
from neuron_serve.loading import build_engine
from neuron_serve.request import ErrorEvent, Event, GenerationRequest, SamplingParams, StoppingParams, TokenEvent

from .channel import Address, Outbox
from .metrics import BatcherMetrics
from .ray_env import REQUEST_LINE, keep_request_lines_off_stderr

logger = logging.getLogger("ray.serve")

# A request held this long without a token (queued for a row, or in a long prefill) is reported to its ingress,
# which then no longer checks whether the app is being deleted: a graceful deletion finishes it here.
IN_HAND_AFTER_S = 0.5
RECENT_TOKEN_S = 10.0  # a replica that produced a token this recently is healthy without a probe
GAUGES_EVERY_S = 5.0  # an idle replica's batch gauges are set this often (Ray exports every 10 s)


class NeuronBatcher:
    async def __init__(self, config: Config):
        keep_request_lines_off_stderr()
        context = serve.get_replica_context()
        self.replica = context.replica_tag
        self.cores = os.environ.get("NEURON_RT_VISIBLE_CORES") or ""
        self.config = config
        logger.info("NeuronBatcher %s: NeuronCores [%s], loading %s (backend %s)",
                    self.replica, self.cores or "none", config.model_id, config.backend)
        if config.torch_threads:
            import torch

            torch.set_num_threads(config.torch_threads)
        started = time.monotonic()
        # Minutes for a compiled model on inf2: off the event loop, bounded by the configured timeout.
        engine = await asyncio.wait_for(asyncio.to_thread(build_engine, config), timeout=config.startup_timeout_s)
        self.metrics = BatcherMetrics(engine.limits, self.cores or "none")
        self.engine = AsyncEngine(engine, on_step=self._on_step, stream_interval=config.stream_interval,
                                  step_timeout_s=config.step_timeout_s, between_steps=self.metrics.flush)
        self.engine.start()
        self.outbox = Outbox()
        self.last_token_at = 0.0
        self.served = 0  # requests this replica has taken
        self._gauges = asyncio.create_task(self._keep_gauges())
        logger.info("NeuronBatcher %s ready in %.1fs: %s, %d rows", self.replica, time.monotonic() - started,
                    engine.backend.description, engine.limits.max_batch_size)

    def _on_step(self, stats) -> None:
        self.metrics.record(stats)
        if not stats.failed:
            self.last_token_at = time.monotonic()

    async def _keep_gauges(self) -> None:
        engine = self.engine.engine
        while True:
            self.metrics.gauges(len(engine.batch.active()), len(engine.waiting))
            await asyncio.sleep(GAUGES_EVERY_S)

    async def generate(self, request: GenerationRequest, reply_to: Address) -> None:
        """Runs `request`, sending its events to the ingress at `reply_to`; returns once the last is written."""
        self.served += 1
        channel = self.outbox.channel(reply_to)
        generated = 0
        last: Event | None = None
        handed_over = time.monotonic()  # when it arrived, then when its latest tokens came
        in_hand = asyncio.get_running_loop().call_later(IN_HAND_AFTER_S, channel.send, request.id, [])

        def deliver(events: list[Event]) -> None:
            nonlocal generated, last, handed_over
            in_hand.cancel()
            channel.send(request.id, events)
            tokens = sum(isinstance(e, TokenEvent) for e in events)
            if tokens:
                now = time.monotonic()
                self.metrics.delivered(now - handed_over, tokens, first=generated == 0)
                handed_over = now
            generated += tokens
            last = events[-1]

        done = self.engine.open(request, deliver)
        channel.attach(request.id, done)
        try:
            await done
            await channel.drain()
        finally:
            in_hand.cancel()
            channel.detach(request.id)
            self.engine.cancel(request.id)  # nothing once it finished
            self._log_request(request, generated, last)

    def _log_request(self, request: GenerationRequest, generated: int, last: Event | None) -> None:
        """One structured line per request (never its text); Serve adds the HTTP request id."""
        fields = (f"replica={self.replica} cores={self.cores or 'none'} input_tokens={len(request.input_ids)} "
                  f"output_tokens={generated}")
        if isinstance(last, TokenEvent) and last.finish is not None:
            f = last.finish
            # Its queue here is this replica's; the ingress's x-queue-time adds the wait in Serve's queue.
            logger.info("request done: %s finish=%s replica_queue_ms=%.1f inference_ms=%.1f", fields, f.reason.value,
                        f.queue_time * 1000, f.inference_time * 1000, extra=REQUEST_LINE)
        elif isinstance(last, ErrorEvent):
            logger.info("request failed: %s error=%r", fields, last.message, extra=REQUEST_LINE)
        else:
            logger.info("request cancelled: %s", fields, extra=REQUEST_LINE)

    async def probe(self) -> bool:
        """True when this replica can produce a token: it just did, or it does one now."""
        if not self.engine.healthy:
            return False
        if time.monotonic() - self.last_token_at < RECENT_TOKEN_S:
            return True
        engine = self.engine.engine
        first_token = engine.tokenizer.bos_token_id
        if first_token is None:
            first_token = 0
        probe = GenerationRequest(f"probe-{uuid.uuid4().hex}", (first_token,), SamplingParams(), StoppingParams(1))
        async for events in self.engine.generate(probe):
            return isinstance(events[-1], TokenEvent)
        return False

    async def status(self) -> dict[str, Any]:
        engine = self.engine.engine
        return {
            "replica": self.replica,
            "neuron_cores": self.cores or None,
            "backend": engine.backend.description,
            "insertion": engine.scheduler.insertion.name,
            "stream_interval": self.engine.stream_interval,
            "batch_size": engine.limits.max_batch_size,
            "active": len(engine.batch.active()),
            "waiting": len(engine.waiting),
            "served": self.served,
            "healthy": self.engine.healthy,
            "as_of": time.time(),  # when it answered: /info shows the last answers of a replica too busy to answer
        }

    async def inject_fault(self, kind: str, times: int, stall_s: float = 0.0) -> None:
        """Tests only (`fault_injection: true`): the next `times` forwards of `kind` fail in the backend,
        or with `stall_s` hang that long."""
        if not self.config.fault_injection:
            raise PermissionError("fault injection is off on this replica (`fault_injection: false`)")
        self.engine.engine.backend.arm(kind, times, stall_s)

    async def check_health(self) -> None:
        """Ray Serve's health check, which Serve's controller calls past `max_ongoing_requests`: a replica
        whose step loop died, whose step is stuck, or whose backend keeps failing is replaced."""
        if not self.engine.healthy:
            raise RuntimeError(f"NeuronBatcher {self.replica} is unhealthy: its step loop died, a step ran past "
                               f"step_timeout_s ({self.config.step_timeout_s} s), or its backend keeps failing")

    async def __del__(self) -> None:
        if hasattr(self, "_gauges"):
            self._gauges.cancel()
        if hasattr(self, "engine"):
            self.engine.stop()
        if hasattr(self, "outbox"):
            await self.outbox.close()  # Serve calls this after draining the requests, before the process exits
