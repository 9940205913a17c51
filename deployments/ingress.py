"""The HTTP ingress: TGI's API in front of the NeuronBatcher replicas.

It loads only the tokenizer and configuration files (never Neuron: an actor without `neuron_cores`
would see the node's cores), validates and tokenizes every request, runs it on one batcher replica
chosen by Serve's router, and streams its events from the replica's channel to this one's inbox.
`/health`, `/info` and `/metrics` ask all replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace
from typing import Any, AsyncIterator, Awaitable, Callable, Literal

import ray
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ApplicationStatus, ApplicationStatusOverview, ReplicaState

from neuron_serve import __version__
from neuron_serve.config import Config
from neuron_serve.loading import model_limits
from neuron_serve.model_files import load_tokenizer, resolve_model_dir
from neuron_serve.request import ErrorEvent, Event, GenerationRequest, TokenEvent, is_last

from .batcher import RECENT_TOKEN_S
from .channel import Inbox
from .http_api import build_http_app
from .metrics import IngressMetrics, scrape_cluster, tgi_metrics_text
from .ray_env import keep_request_lines_off_stderr
from .service import TextGeneration

logger = logging.getLogger("ray.serve")

REPLICA_LOST = (RayActorError, ActorUnavailableError)  # the replica process died or cannot be reached
# /info asks the batchers for their status for this long: one with `max_ongoing_requests` in hand answers only
# once one of its requests ends, and Serve's broadcast gives all the answers or none. Past it, /info shows
# the last answers it had, each with the time it was given (`as_of`).
STATUS_TIMEOUT_S = 2.0
METRICS_FRESH_S = 1.0  # /metrics callers this close together share one reading of the cluster's metrics
QUEUE_GAUGE_EVERY_S = 1.0  # `tgi_queue_size` is set this often (Ray exports every 10 s, and drops a gauge not set)


class BatcherSource:
    """Runs a request on one NeuronBatcher replica and streams its events from this replica's inbox.

    Serve's call picks the replica and ends when the request does; the events come over the inbox
    (`channel.py`). Stopping early cancels the call, and with it the request. A replica that dies
    before the request's first event (it was killed, or Serve had not yet heard that it is gone) costs
    nothing visible: the request is sent again, and Serve's router, which drops a replica it saw die,
    picks another. Once events have flowed, the request ends with an error event. A call that returns
    without its last event having come ends the stream there, which the caller reports as incomplete.

    A request also waits in Serve's queue while every batcher has `max_ongoing_requests` in hand, as a
    TGI request waits in the router's. So its queue time counts from its call here (the time to its
    last event less the engine's inference time), and `queued` holds every request that has no event
    yet: in Serve's queue, in a batcher's, or in its prefill.

    A request still waiting for its first event asks, each second, whether its app is being deleted:
    the batchers leave Serve's router as their app's deletion begins, while HAProxy may still send this
    ingress requests for a moment, and Serve would hold such a request until this replica is killed.
    It ends with a 503 instead. Waiting with no batcher is otherwise right (they are loading, being
    replaced, or scaling up from zero), so the app's status decides, not the count of batchers. A request
    a batcher holds (in its queue, or a long prefill) is in hand, and finishes during the deletion: the
    batcher says so with an empty hand-over once it has held it `batcher.IN_HAND_AFTER_S` without a token.
    """

    ATTEMPTS = 3
    LAST_EVENTS_WAIT_S = 10.0  # the call returned: its last events were written, and are on their way
    DELETION_CHECK_S = 1.0  # how often a request that has no event yet asks whether its app is being deleted

    def __init__(self, handle: DeploymentHandle, inbox: Inbox, app_deleting: Callable[[], Awaitable[bool]]):
        self.handle = handle
        self.inbox = inbox
        self.app_deleting = app_deleting
        self.queued: set[str] = set()  # requests with no event yet (`tgi_queue_size`)
        self.in_flight = 0  # requests streaming, or waiting for their first event
        self.last_token_at = float("-inf")  # when a token last came, unless a generation failed since (`/health`)

    @property
    def generating(self) -> bool:
        """A batcher produced a token lately, no generation failed since, and a request is still generating."""
        return self.in_flight > len(self.queued) and time.monotonic() - self.last_token_at < RECENT_TOKEN_S

    async def stream(self, request: GenerationRequest) -> AsyncIterator[list[Event]]:
        self.queued.add(request.id)
        self.in_flight += 1
        try:
            async with contextlib.aclosing(self._attempts(request)) as handovers:
                async for events in handovers:
                    self.queued.discard(request.id)
                    if isinstance(events[-1], ErrorEvent) and events[-1].error_type == "generation":
                        self.last_token_at = float("-inf")  # a generation failed: `/health` asks the batchers
                    elif isinstance(events[0], TokenEvent):
                        self.last_token_at = time.monotonic()
                    yield events
        finally:
            self.queued.discard(request.id)
            self.in_flight -= 1

    async def _attempts(self, request: GenerationRequest) -> AsyncIterator[list[Event]]:
        reply_to = await self.inbox.address()
        sent = time.monotonic()
        for attempt in range(1, self.ATTEMPTS + 1):
            # A resend goes under an id of its own: a replica that was unreachable, not dead, may still
            # run the first, and its events must not reach this one, nor its id be in flight twice there.
            outgoing = request if attempt == 1 else replace(request, id=f"{request.id}.{attempt}")
            events_in = self.inbox.open(outgoing.id)
            response = self.handle.generate.remote(outgoing, reply_to)
            call = asyncio.ensure_future(response)
            call.add_done_callback(events_in.put_nowait)  # the call's end arrives in line with the events
            started = finished = returned = in_hand = False
            try:
                while True:
                    if returned:
                        item = await asyncio.wait_for(events_in.get(), self.LAST_EVENTS_WAIT_S)
                    elif started or in_hand:
                        item = await events_in.get()
                    else:
                        item = await self._first_event(events_in)
                        if item is None:
                            yield [ErrorEvent(request.id, "The server is shutting down: this model is no longer "
                                                          "served here", "unhealthy")]
                            return
                    if isinstance(item, list) and not item:  # a batcher has it, with no token yet
                        in_hand = True  # it finishes it even while the app is deleted (not `started`: resendable)
                    elif item is not call:
                        started, finished = True, is_last(item[-1])
                        finish = getattr(item[-1], "finish", None)
                        if finish is not None:
                            finish.queue_time = max(0.0, time.monotonic() - sent - finish.inference_time)
                        yield item
                        if finished:
                            return
                    elif item.exception() is None:
                        returned = True
                    else:
                        raise item.exception()
            except REPLICA_LOST as e:
                if not started and attempt < self.ATTEMPTS:
                    logger.warning("request %s: its replica was lost before the first token (%s); sending it again",
                                   request.id, type(e).__name__)
                    continue
                failure = e
            except asyncio.TimeoutError:  # the caller reports the generation incomplete
                logger.warning("request %s: its replica finished it, but its last events never came", request.id)
                return
            except Exception as e:  # the replica could not be reached, or failed outside the engine
                failure = e
            finally:
                self.inbox.close(outgoing.id)
                if not finished:
                    response.cancel()
                    call.cancel()
            logger.warning("request %s lost its replica: %s: %s", request.id, type(failure).__name__, failure)
            yield [ErrorEvent(request.id, "Request failed during generation: the replica serving it failed "
                                          f"({type(failure).__name__})")]
            return

    async def _first_event(self, events_in: asyncio.Queue) -> Any:
        """The request's first item, or None once its app is being deleted. Asking Serve's controller
        (slow, or not answering while it restarts) never holds back an item that came meanwhile."""
        getting = asyncio.ensure_future(events_in.get())
        try:
            while True:
                done, _ = await asyncio.wait({getting}, timeout=self.DELETION_CHECK_S)
                if done:
                    return getting.result()
                checking = asyncio.ensure_future(self.app_deleting())
                await asyncio.wait({getting, checking}, return_when=asyncio.FIRST_COMPLETED)
                if getting.done():
                    checking.cancel()
                    return getting.result()
                if checking.result():
                    return None
        finally:
            getting.cancel()  # nothing once it has its item; a queue keeps an item a cancelled get did not take


class AppStatus:
    """This replica's app as Serve's controller sees it. The controller is asked (`serve.status()`, off the
    event loop) at most once a `period_s`, never twice at a time, and every caller shares the answer."""

    def __init__(self, period_s: float):
        self.period_s = period_s
        self._asked_at = 0.0
        self._answer: asyncio.Future | None = None

    async def deleting(self) -> bool:
        """The app is being deleted (or is gone). False when the controller cannot be reached: nothing
        says the app is going."""
        app = await self._app()
        return app is not False and (app is None or app.status == ApplicationStatus.DELETING)

    async def batchers_running(self) -> bool:
        """Serve has a NeuronBatcher replica running: one that passes its health checks (`check_health`),
        which the controller makes past `max_ongoing_requests`."""
        app = await self._app()
        batchers = app.deployments.get("NeuronBatcher") if app else None
        return batchers is not None and batchers.replica_states.get(ReplicaState.RUNNING, 0) > 0

    async def _app(self) -> ApplicationStatusOverview | None | Literal[False]:
        """The app's status, None when Serve has no such app, False when the controller cannot be reached."""
        if self._answer is None or (self._answer.done() and time.monotonic() - self._asked_at >= self.period_s):
            self._asked_at = time.monotonic()
            self._answer = asyncio.ensure_future(asyncio.to_thread(self._ask, serve.get_replica_context().app_name))
        return await asyncio.shield(self._answer)

    @staticmethod
    def _ask(app_name: str) -> ApplicationStatusOverview | None | Literal[False]:
        try:
            return serve.status().applications.get(app_name)
        except Exception as e:
            logger.info("serve.status(): %s: %s", type(e).__name__, e)
            return False


@serve.ingress()
class Ingress:
    async def __init__(self, batcher: DeploymentHandle, config: Config):
        keep_request_lines_off_stderr()
        # Calls over Serve's gRPC transport, whatever process built the app: `serve run serve_config.yaml`
        # builds it where RAY_SERVE_USE_GRPC_BY_DEFAULT is set, a Python `serve.run(build_app(...))` may not.
        batcher = batcher.options(_by_reference=False)
        self.batcher = batcher
        self.config = config
        model_dir = resolve_model_dir(config, weights=False)
        self.limits = model_limits(config, model_dir)
        request_metrics = IngressMetrics(self.limits)
        self.app_status = AppStatus(BatcherSource.DELETION_CHECK_S)
        source = BatcherSource(batcher, Inbox(ray.util.get_node_ip_address()), self.app_status.deleting)
        self.source = source
        self._queue_gauge = asyncio.create_task(self._keep_queue_gauge(request_metrics, source))
        self.service = TextGeneration(
            config, self.limits, load_tokenizer(model_dir, config.token), source,
            model_id=config.model_id, compute_type=config.compute_type or config.backend, metrics=request_metrics,
        )
        self._metrics: tuple[float, asyncio.Future[str]] | None = None  # the latest reading of /metrics, and when
        self._statuses: list[dict[str, Any]] = []  # the batchers' answers to /info's last broadcast that had them all
        logger.info("Ingress ready for %s: %s", config.model_id, self.limits)

    @staticmethod
    async def _keep_queue_gauge(metrics: IngressMetrics, source: BatcherSource) -> None:
        while True:
            metrics.queued(len(source.queued))
            await asyncio.sleep(QUEUE_GAUGE_EVERY_S)

    def __serve_build_asgi_app__(self):
        return build_http_app(self.service, self, self.config)

    async def _replicas(self, method: str, timeout: float) -> list[Any] | None:
        """Every batcher's answer; None when one did not answer in time, [] when there is none."""
        try:
            return await self.batcher.broadcast(method).results_async(timeout_s=timeout, return_exceptions=True)
        except TimeoutError:
            logger.info("broadcast %s: a replica did not answer in %.1f s", method, timeout)
            return None
        except Exception as e:  # no replica running yet
            logger.info("broadcast %s: %s: %s", method, type(e).__name__, e)
            return []

    async def health(self) -> bool:
        """200 once a batcher replica produces a token (503 while they load, or when none can).

        Requests generating here are proof enough (`BatcherSource.generating`). Otherwise every batcher
        is probed. A batcher with `max_ongoing_requests` in hand (busy with this ingress's requests, or
        another ingress replica's) holds every call, a probe too, until one of its requests ends; when a
        probe is held past `health_probe_timeout_s`, Serve's own health checks decide, which reach a
        replica past that limit and replace one whose step is stuck (`NeuronBatcher.check_health`)."""
        if self.source.generating:
            return True
        results = await self._replicas("probe", self.config.health_probe_timeout_s)
        if results is None:
            return await self.app_status.batchers_running()
        return any(r is True for r in results)

    async def info(self) -> dict[str, Any]:
        answers = await self._replicas("status", STATUS_TIMEOUT_S)
        if answers is not None:  # None: one was too busy to answer in time, and the last answers stand
            self._statuses = [r for r in answers if isinstance(r, dict)]
        replicas = self._statuses
        limits = self.limits
        return {
            "model_id": self.config.model_id,
            "model_sha": self.config.revision,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": self.config.max_concurrent_requests,
            "max_best_of": self.config.max_best_of,
            "max_stop_sequences": self.config.max_stop_sequences,
            "max_input_tokens": limits.max_input_tokens,
            "max_total_tokens": limits.max_total_tokens,
            "validation_workers": 1,
            "max_client_batch_size": self.config.max_client_batch_size,
            "router": "neuron-serve",
            "version": __version__,
            "sha": None,
            "docker_label": None,
            "max_input_length": limits.max_input_tokens,
            "max_batch_total_tokens": limits.max_batch_size * limits.max_total_tokens,
            "max_batch_size": limits.max_batch_size,
            "model_dtype": self.config.dtype,
            "model_device_type": "neuron" if self.config.backend == "neuron" else "cpu",
            "max_batch_prefill_tokens": limits.max_batch_prefill_tokens,
            "insertion": replicas[0]["insertion"] if replicas else self.config.insertion,
            "backend": self.config.backend,
            "replicas": sorted(replicas, key=lambda r: r.get("neuron_cores") or ""),
        }

    async def metrics(self) -> str:
        """TGI's page. It reads every node's Ray metrics: callers within METRICS_FRESH_S of one another share
        one reading, so that a client calling it in a loop costs the cluster at most one a second."""
        now = time.monotonic()
        if self._metrics is None or now - self._metrics[0] > METRICS_FRESH_S:
            self._metrics = (now, asyncio.ensure_future(self._read_metrics()))
        return await asyncio.shield(self._metrics[1])

    @staticmethod
    async def _read_metrics() -> str:
        pages = await scrape_cluster()
        return await asyncio.to_thread(tgi_metrics_text, pages, serve.get_replica_context().app_name)
