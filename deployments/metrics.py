"""TGI's Prometheus metrics, recorded where each event happens, exported through Ray.

Both deployments record with `ray.serve.metrics`, so every series reaches Ray's Prometheus export
(named `ray_<name>`, with Serve's `application`, `deployment` and `replica` labels, and a `cores`
label carrying each batcher's NeuronCore group) and the Ray dashboard. The ingress's `/metrics`
then serves them as TGI does: it reads every node's Ray metrics page, keeps the `ray_tgi_*` series,
drops the per-replica labels, sums across replicas, and prints TGI's exact names and buckets. Series
TGI does not have (time to first token, inter-token latency, each batcher's own queue) are named
`neuron_serve_*`, so they stay out of that page and appear only in Ray's export, for the Grafana
dashboard in `deployments/grafana/`.

Ray's agent rebuilds each histogram from its bucket counts, every value at its bucket's midpoint
(Ray 2.60, `OpenTelemetryMetricRecorder.record_histogram_aggregated_batch`), so a `ray_*_sum` is an
estimate: four answers of 10, 10, 10 and 100 tokens sum to about 113, not 130. Each histogram here
therefore has a counter beside it, `<name>_exact_sum`, that adds the values themselves; `/metrics`
prints its total as the histogram's `_sum`, and the Grafana dashboard reads it where it needs a sum.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.request
from collections import defaultdict, deque
from typing import Any, Callable

from neuron_serve.config import Limits
from neuron_serve.engine import StepStats

from .validation import DEFAULT_GENERATION_LENGTH

logger = logging.getLogger(__name__)

TGI_LABELS = {"method", "err", "reason", "le"}  # the labels TGI's own series carry
PREFIX = "ray_tgi_"
EXACT_SUM = "_exact_sum"


def _duration_buckets(n: int = 35) -> list[float]:
    """TGI's, to the last bit (`router/src/server.rs`): 0.0001 times 1.5, again and again."""
    buckets, value = [], 0.0001
    for _ in range(n):
        value *= 1.5
        buckets.append(value)
    return buckets


def _linear(upper: int, n: int = 100) -> list[float]:
    """TGI's token-count buckets: `upper` in `n` equal steps."""
    return [(upper / n) * (i + 1) for i in range(n)]


DURATION_BUCKETS = _duration_buckets()
# TGI's are 1 to 1024 one by one. Ray exports every bucket of every replica as a series of its own, so
# these stop at 64 one by one (an inf2 batch is rarely larger), then double. Fixed, not the batch size:
# Ray's agent keeps the first bounds a histogram's name is registered with, for every app on its node.
NEXT_SIZE_BUCKETS = [float(i) for i in range(1, 65)] + [128.0, 256.0, 512.0, 1024.0]


class TgiHistogram:
    """A Ray histogram, and the exact sum of what it observed (see the module's docstring)."""

    def __init__(self, name: str, description: str, boundaries: list[float], tag_keys: tuple[str, ...] | None = None):
        from ray.serve import metrics

        self.histogram = metrics.Histogram(name, description=description, boundaries=boundaries, tag_keys=tag_keys)
        self.sum = metrics.Counter(name + EXACT_SUM, description=f"{description}: the sum of the values",
                                   tag_keys=tag_keys)

    def set_default_tags(self, tags: dict[str, str]) -> None:
        self.histogram.set_default_tags(dict(tags))  # Serve adds its own tags to the dict it is given
        self.sum.set_default_tags(dict(tags))

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.histogram.observe(value, tags=tags)
        if value > 0:  # a counter only goes up
            self.sum.inc(value, tags=tags)


class IngressMetrics:
    """Request-level metrics, recorded by the HTTP ingress."""

    def __init__(self, limits: Limits):
        from ray.serve.metrics import Counter, Gauge

        self.count = Counter("tgi_request_count", description="Requests received")
        self.success = Counter("tgi_request_success", description="Requests that generated successfully")
        self.failure = Counter("tgi_request_failure", description="Failed requests by error type", tag_keys=("err",))
        self.queue_size = Gauge("tgi_queue_size", description="Requests with no token yet: in Serve's queue, a "
                                                              "batcher's, or their prefill")
        d = lambda name, text: TgiHistogram(name, text, DURATION_BUCKETS)  # noqa: E731
        self.duration = d("tgi_request_duration", "End-to-end request duration (s)")
        self.validation = d("tgi_request_validation_duration", "Validation and tokenization (s)")
        self.queue = d("tgi_request_queue_duration", "Time waiting for a batch row (s)")
        self.inference = d("tgi_request_inference_duration", "Time from prefill to last token (s)")
        self.per_token = d("tgi_request_mean_time_per_token_duration", "Mean time per generated token (s)")
        self.input_length = TgiHistogram("tgi_request_input_length", "Prompt tokens", _linear(limits.max_input_tokens))
        self.generated = TgiHistogram("tgi_request_generated_tokens", "Generated tokens", _linear(limits.max_total_tokens))
        # TGI records the first round's: at most DEFAULT_GENERATION_LENGTH.
        self.max_new_tokens = TgiHistogram("tgi_request_max_new_tokens", "Requested max_new_tokens (first round)",
                                           _linear(limits.max_total_tokens))

    def received(self) -> None:
        self.count.inc()

    def validated(self, input_length: int, max_new_tokens: int) -> None:
        self.input_length.observe(input_length)
        self.max_new_tokens.observe(min(max_new_tokens, DEFAULT_GENERATION_LENGTH))

    def succeeded(self, total: float, validation: float, queue: float, inference: float, generated_tokens: int) -> None:
        """As TGI, the durations are recorded for requests that succeed only."""
        self.success.inc()
        self.duration.observe(total)
        self.validation.observe(validation)
        self.queue.observe(queue)
        self.inference.observe(inference)
        self.generated.observe(generated_tokens)
        if generated_tokens:
            self.per_token.observe(inference / generated_tokens)

    def failed(self, err: str) -> None:
        self.failure.inc(tags={"err": err})

    def queued(self, requests: int) -> None:
        self.queue_size.set(requests)


class BatcherMetrics:
    """Batch-level metrics, recorded by each NeuronBatcher replica after every engine step.

    Each call into Ray's metrics lets go of the GIL and takes it back. Made on the batcher's event loop,
    beside the engine's step thread, which needs the GIL between its tensor operations, each such call
    handed the GIL to the step thread and waited to get it back: at 8 streams, about 22 calls a step
    more than doubled the step thread's context switches. So `record`, `gauges` and `delivered` only
    queue their calls, and `flush` makes them: the step thread calls it between steps
    (`AsyncEngine(between_steps=)`), while the event loop has nothing to do. Measured: 981–986 tok/s
    against 866–972 (docs/performance.md, "The model and Ray Serve on two cores")."""

    def __init__(self, limits: Limits, cores: str):
        from ray.serve import metrics

        method = ("method", "cores")
        self.inference_count = metrics.Counter("tgi_batch_inference_count", description="Forward passes", tag_keys=method)
        self.inference_success = metrics.Counter("tgi_batch_inference_success", description="Successful forward passes",
                                                 tag_keys=method)
        self.inference_failure = metrics.Counter("tgi_batch_inference_failure", description="Failed forward passes",
                                                 tag_keys=method)
        self.concat = metrics.Counter("tgi_batch_concat", description="Prefills that inserted requests into a running batch",
                                      tag_keys=("reason", "cores"))
        cores_only = ("cores",)
        gauge = lambda name, text: metrics.Gauge(name, description=text, tag_keys=cores_only)  # noqa: E731
        self.current_size = gauge("tgi_batch_current_size", "Busy rows of the static batch")
        self.current_max_tokens = gauge("tgi_batch_current_max_tokens", "Token capacity of the busy rows")
        # TGI's queue is the ingresses' `tgi_queue_size`, which Serve's queue is part of; this is one batcher's.
        self.queue_size = gauge("neuron_serve_batcher_queue_size", "Requests this batcher took that wait for a row")
        self.max_total_tokens = gauge("tgi_batch_max_total_tokens", "Token capacity of the static batch")
        self.next_size = TgiHistogram("tgi_batch_next_size", "New requests a prefill took in", NEXT_SIZE_BUCKETS,
                                      cores_only)
        d = lambda name, text: TgiHistogram(name, text, DURATION_BUCKETS, method)  # noqa: E731
        self.inference_duration = d("tgi_batch_inference_duration", "Whole step: forward, sampling, detokenizing (s)")
        self.forward_duration = d("tgi_batch_forward_duration", "Backend forward pass (s)")
        self.decode_duration = d("tgi_batch_decode_duration", "Sampling, detokenizing and stopping (s)")
        self.filter_duration = d("tgi_batch_filter_duration", "Handing the step's tokens to their requests (s)")
        # TGI labels it `decode` wherever it happens: the running batch's pause to take new requests in.
        self.concat_duration = d("tgi_batch_concat_duration", "Prefill that inserted into a running batch (s)")
        # Not on TGI's page, and observed per token: plain Ray histograms.
        self.time_to_first_token = metrics.Histogram(
            "neuron_serve_time_to_first_token", description="From the request reaching the replica to its first token (s)",
            boundaries=DURATION_BUCKETS, tag_keys=cores_only)
        self.inter_token_latency = metrics.Histogram(
            "neuron_serve_inter_token_latency", description="Between two hand-overs of a request's tokens, per token (s)",
            boundaries=DURATION_BUCKETS, tag_keys=cores_only)
        self.limits = limits
        for metric in (self.inference_count, self.inference_success, self.inference_failure, self.concat,
                       self.current_size, self.current_max_tokens, self.queue_size, self.max_total_tokens,
                       self.next_size, self.inference_duration, self.forward_duration, self.decode_duration,
                       self.filter_duration, self.concat_duration, self.time_to_first_token, self.inter_token_latency):
            metric.set_default_tags({"cores": cores})
        self._queued: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()  # thread-safe appends and pops

    def flush(self) -> None:
        """Makes the queued calls; on the engine's step thread, between steps."""
        while self._queued:
            method, args = self._queued.popleft()
            try:
                method(*args)
            except Exception:  # a metric is never worth a request
                logger.exception("recording a metric failed")

    def gauges(self, active: int, waiting: int) -> None:
        """The batch's state. Ray exports a gauge only if it was set since its last export (every 10 s),
        so the batcher sets them after each step and, while idle, every few seconds."""
        self._queued.append((self._set_gauges, (active, waiting)))

    def record(self, step: StepStats) -> None:
        self._queued.append((self._record, (step,)))

    def delivered(self, seconds: float, tokens: int, first: bool) -> None:
        self._queued.append((self._delivered, (seconds, tokens, first)))

    def _set_gauges(self, active: int, waiting: int) -> None:
        self.max_total_tokens.set(self.limits.max_batch_size * self.limits.max_total_tokens)
        self.current_size.set(active)
        self.current_max_tokens.set(active * self.limits.max_total_tokens)
        self.queue_size.set(waiting)

    def _record(self, step: StepStats) -> None:
        """One engine step. As TGI, the batch's size and reason are counted when it forms, and a failed
        forward records no duration."""
        tags = {"method": step.kind}
        self.inference_count.inc(tags=tags)
        self._set_gauges(step.active, step.waiting)
        if step.inserted:
            self.next_size.observe(step.inserted)
        if step.concat is not None:
            self.concat.inc(tags={"reason": step.concat})
        if step.failed:
            self.inference_failure.inc(tags=tags)
            return
        self.inference_success.inc(tags=tags)
        # TGI times the whole prefill or decode call, the hand-over of its tokens included.
        self.inference_duration.observe(step.total_s + step.filter_s, tags=tags)
        self.forward_duration.observe(step.forward_s, tags=tags)
        self.decode_duration.observe(step.total_s - step.forward_s, tags=tags)
        self.filter_duration.observe(step.filter_s, tags=tags)
        if step.concat is not None:
            self.concat_duration.observe(step.total_s, tags={"method": "decode"})

    def _delivered(self, seconds: float, tokens: int, first: bool) -> None:
        """One hand-over of `tokens` token events to a request, `seconds` after it arrived (the first) or after
        its previous hand-over. A hand-over of several tokens is one gap shared evenly among them, so the
        inter-token count is the number of tokens after the first hand-over and nothing records a zero gap;
        tokens that came with the first one have no gap of their own and are not counted."""
        if first:
            self.time_to_first_token.observe(seconds)
            return
        for _ in range(tokens):
            self.inter_token_latency.observe(seconds / tokens)


# -- /metrics: read Ray's export, answer in TGI's names ---------------------------------------------


def _fetch(url: str, timeout: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (cluster-internal address)
        return response.read().decode()


async def scrape_cluster(timeout: float = 5.0) -> list[str]:
    """Every live node's Ray metrics page."""
    import ray

    urls = [
        f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        for node in ray.nodes()
        if node.get("Alive") and node.get("MetricsExportPort")
    ]
    pages = await asyncio.gather(*(asyncio.to_thread(_fetch, url, timeout) for url in urls), return_exceptions=True)
    for url, page in zip(urls, pages):
        if isinstance(page, Exception):
            logger.warning("could not read metrics from %s: %s", url, page)
    return [p for p in pages if isinstance(p, str)]


def tgi_metrics_text(pages: list[str], application: str | None = None) -> str:
    """Sum one application's `ray_tgi_*` series over replicas and nodes; print them under TGI's names,
    each histogram's `_sum` from its exact-sum counter."""
    from prometheus_client.parser import text_string_to_metric_families

    # Ray's own series fill most of a page: only ours are parsed (a sample line, or its HELP and TYPE).
    pages = ["\n".join(line for line in page.splitlines() if line.startswith(PREFIX) or line[7:].startswith(PREFIX))
             for page in pages]
    kinds: dict[str, str] = {}
    helps: dict[str, str] = {}
    values: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
    exact_sums: dict[tuple, float] = defaultdict(float)  # (histogram's `_sum` sample name, labels) -> total
    for page in pages:
        for family in text_string_to_metric_families(page):
            if not family.name.startswith(PREFIX):
                continue
            name = family.name[len("ray_"):]
            exact = name.endswith(EXACT_SUM)
            if not exact:
                kinds[name], helps[name] = family.type, family.documentation
            for sample in family.samples:
                if application is not None and sample.labels.get("application") != application:
                    continue
                sample_name = sample.name[len("ray_"):]
                if family.type == "counter" and sample_name.endswith("_total"):
                    sample_name = sample_name[: -len("_total")]
                if sample_name.endswith("_created"):
                    continue
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k in TGI_LABELS))
                if exact:
                    exact_sums[(name[: -len(EXACT_SUM)] + "_sum", labels)] += sample.value
                else:
                    values[name][(sample_name, labels)] += sample.value
    for name, kind in kinds.items():
        if kind == "histogram":
            for key in values[name]:
                if key[0] == name + "_sum":  # no counter: nothing above zero was observed
                    values[name][key] = exact_sums.get(key, 0.0)
    lines = []
    for name in sorted(values):
        lines.append(f"# HELP {name} {helps[name]}")
        lines.append(f"# TYPE {name} {kinds[name]}")
        for (sample_name, labels), value in sorted(values[name].items(), key=lambda kv: _sample_order(kv[0])):
            label_text = ",".join(f'{k}="{_le(v) if k == "le" else v}"' for k, v in labels)
            lines.append(f"{sample_name}{{{label_text}}} {_number(value)}" if label_text else f"{sample_name} {_number(value)}")
    return "\n".join(lines) + "\n"


def _sample_order(key: tuple) -> tuple:
    sample_name, labels = key
    le = dict(labels).get("le")
    bound = float("inf") if le in (None, "+Inf") else float(le)
    return (sample_name, tuple((k, v) for k, v in labels if k != "le"), bound)


def _le(bound: str) -> str:
    """A bucket's bound as TGI's exporter writes it (Rust's shortest form: `1`, `0.00015`)."""
    return bound if bound == "+Inf" else _number(float(bound))


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)
