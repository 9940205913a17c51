#!/usr/bin/env python
"""Load generator for TGI-compatible servers, with a side-by-side mode and a simulated inf2 fleet.

Streams requests (prompts and output lengths drawn from a seed) in a closed loop at N concurrent
streams, or in an open loop at Poisson request rates, and reports time to first token (TTFT),
inter-token latency (ITL) and end-to-end latency (p50/p90/p99), request and token throughput and
errors. Writes a PNG (throughput vs load, latency CDFs) and a JSON file under --out, prints a table,
then the JSON summary as the last line.

    python scripts/bench.py --url http://localhost:8000 [--api tgi|openai] [--concurrency 1,8,32 | --rate 2,4]
    python scripts/bench.py --engine                   # the engine in this process: no Ray, no HTTP
    python scripts/bench.py --side-by-side             # engine alone, `serve run serve_config.yaml`, `transformers serve`
                                                       # (and the idle TTFT of a no-op app on the same hops)
    python scripts/bench.py --simulate inf2.48xlarge   # a fleet of simulated NeuronCore groups, 1000 streams

Tokens are counted as they arrive, in pieces: what one network read brings (TGI events, one token
each) or one engine hand-over, special tokens such as EOS left out. An OpenAI stream carries text,
several tokens per chunk; its tokens are counted against the engine's own tokens for the same prompt
where the text matches (side-by-side), else by re-tokenizing the text so far. A piece of k tokens
counts k ITLs, each its gap to the previous piece / k.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Protocol

import aiohttp
import httpx
import yaml
from tqdm import tqdm

from neuron_serve.async_engine import AsyncEngine
from neuron_serve.config import DEFAULT_BATCH_SIZE, Config, load_config
from neuron_serve.loading import build_engine
from neuron_serve.model_files import load_tokenizer, resolve_model_dir
from neuron_serve.request import ErrorEvent, FinishReason, GenerationRequest, SamplingParams, StoppingParams, TokenEvent
from neuron_serve.tiny_model import corpus_path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TARGETS = {"serve_over_engine": 0.85, "ours_over_transformers_serve": 1.5, "serve_ttft_overhead_ms": 5.0,
           "fleet_over_linear": 0.8}
# Requests per closed-loop run, at least: the idle TTFT overhead is a p50 at one stream, and over 8
# requests it swung by 20 ms between identical runs.
MIN_REQUESTS = 24


def closed_loop_requests(per_stream: int, streams: int) -> int:
    """Requests in a closed-loop run at `streams` concurrent streams."""
    return max(MIN_REQUESTS, per_stream * streams)


# -- the workload ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    prompt: str  # the text sent over HTTP
    prompt_ids: tuple[int, ...]  # the same prompt as the server's tokenizer makes it (BOS included)
    max_new_tokens: int
    arrival: float  # seconds from the start of an open-loop run at 1 request/s (divided by the rate)


def make_workload(tokenizer, n: int, seed: int, prompt_tokens: tuple[int, int], output_tokens: tuple[int, int]) -> list[Job]:
    """`n` prompts cut from the tiny model's corpus, lengths uniform in the given ranges, Poisson arrivals."""
    rng, arrivals = random.Random(seed), random.Random(seed + 1)
    corpus = tokenizer(corpus_path().read_text(encoding="utf-8"), add_special_tokens=False, verbose=False).input_ids
    jobs, t = [], 0.0
    for _ in range(n):
        length = rng.randint(*prompt_tokens)
        start = rng.randrange(0, len(corpus) - length)
        text = tokenizer.decode(corpus[start : start + length])
        t += arrivals.expovariate(1.0)
        jobs.append(Job(text, tuple(tokenizer(text).input_ids), rng.randint(*output_tokens), t))
    return jobs


# -- what is measured ------------------------------------------------------------------------------


@dataclass
class Record:
    start: float = 0.0
    end: float = 0.0
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival time, tokens in the chunk)
    error: str | None = None

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.chunks)

    def ttft(self) -> float | None:
        """Seconds from sending the request to its first token; None if none came."""
        return self.chunks[0][0] - self.start if self.chunks else None

    def itls(self) -> list[float]:
        return [(at - before) / n for (before, _), (at, n) in zip(self.chunks, self.chunks[1:]) for _ in range(n)]

    def tpot(self) -> float | None:
        """Time per output token after the first, whole request: unlike ITL, blind to tokens arriving in bursts."""
        after_first = self.tokens - self.chunks[0][1] if self.chunks else 0
        return (self.chunks[-1][0] - self.chunks[0][0]) / after_first if after_first > 0 else None


def percentile(values: list[float], q: int) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None without values."""
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


@dataclass
class Run:
    target: str
    concurrency: int | None  # closed loop
    rate: float | None  # open loop, requests per second
    records: list[Record]
    seconds: float

    def latencies(self) -> dict[str, list[float]]:
        """Seconds: TTFT, end-to-end and TPOT per successful request, ITL per token."""
        ok = [r for r in self.records if r.error is None]
        return {"ttft": [r.ttft() for r in ok if r.chunks],
                "itl": [gap for r in ok for gap in r.itls()],
                "e2e": [r.end - r.start for r in ok],
                "tpot": [t for r in ok for t in [r.tpot()] if t is not None]}

    def summary(self) -> dict:
        errors = [r.error for r in self.records if r.error is not None]
        tokens = sum(r.tokens for r in self.records if r.error is None)
        out = {"target": self.target, "concurrency": self.concurrency, "rate": self.rate,
               "requests": len(self.records), "errors": len(errors), "seconds": round(self.seconds, 2), "tokens": tokens,
               "req_s": round((len(self.records) - len(errors)) / self.seconds, 3), "tok_s": round(tokens / self.seconds, 1)}
        for name, values in self.latencies().items():
            out[f"{name}_ms"] = {f"p{q}": None if v is None else round(v * 1000, 2)
                                 for q in (50, 90, 99) for v in [percentile(values, q)]}
        if errors:
            out["first_errors"] = sorted(set(errors))[:3]
        return out


# -- targets: a job in, token counts out as they arrive --------------------------------------------


class TargetError(Exception):
    pass


class Target(Protocol):
    name: str

    def stream(self, job: Job) -> AsyncIterator[int]:
        """Yields how many tokens each piece of the answer holds, as it arrives; raises TargetError."""


async def sse_reads(client: aiohttp.ClientSession, url: str, body: dict) -> AsyncIterator[list[dict]]:
    """The `data:` events of each network read, as they arrive. Events written at once (a step's k tokens,
    with `stream_interval` k) arrive at once, and count as one piece of k tokens, as the engine's do."""
    async with client.post(url, json=body) as response:
        if response.status != 200:
            raise TargetError(f"HTTP {response.status}: {(await response.text())[:200]}")
        pending = b""
        async for data in response.content.iter_any():
            *lines, pending = (pending + data).split(b"\n")
            events = [json.loads(line[5:]) for line in lines
                      if line.startswith(b"data:") and line[5:].strip() != b"[DONE]"]
            if events:
                yield events


@dataclass
class TGIStream:
    """TGI's `/generate_stream`: one event per token, the last with `generated_text`; errors as an event."""

    name: str
    url: str
    client: aiohttp.ClientSession

    async def stream(self, job: Job) -> AsyncIterator[int]:
        body = {"inputs": job.prompt, "parameters": {"max_new_tokens": job.max_new_tokens, "do_sample": False}}
        async for events in sse_reads(self.client, f"{self.url}/generate_stream", body):
            tokens = 0
            for event in events:
                if "error" in event:
                    raise TargetError(f"{event.get('error_type')}: {event['error']}")
                tokens += not event["token"]["special"]
                if event.get("generated_text") is not None:
                    yield tokens
                    return
            yield tokens
        raise TargetError("the stream ended before its last event")


@dataclass
class OpenAIChatStream:
    """OpenAI's `/v1/chat/completions` stream, greedy. `reference`: prompt -> each token's text, from
    the engine; a stream whose text matches it is counted exactly, any other by re-tokenizing.
    `eos_after`: prompt -> the tokens the engine generated before the end-of-sequence token it stopped at.
    `transformers serve --continuous_batching` stops at the tokenizer's one EOS id, where the engine stops at
    each of the model's, and streams the others' text: such a prompt is asked for no more tokens than the
    engine generated, so that both do the same work."""

    name: str
    url: str
    client: aiohttp.ClientSession
    model: str
    tokenizer: object
    reference: dict[str, list[str]] = field(default_factory=dict)
    eos_after: dict[str, int] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)  # prompts answered
    matched: set[str] = field(default_factory=set)  # prompts answered with the reference's text exactly

    def count(self, job: Job, text: str) -> tuple[int, bool]:
        pieces = self.reference.get(job.prompt)
        if pieces is None or not "".join(pieces).startswith(text):
            return len(self.tokenizer(text, add_special_tokens=False).input_ids), False
        length = spanned = 0
        for n, piece in enumerate(pieces, 1):  # tokens with no text (part of a character) count with the next one
            if length + len(piece) > len(text):
                break
            length += len(piece)
            spanned = n if piece else spanned
        return spanned, True

    def body(self, job: Job) -> dict:
        max_tokens = max(1, min(job.max_new_tokens, self.eos_after.get(job.prompt, job.max_new_tokens)))
        return {"model": self.model, "messages": [{"role": "user", "content": job.prompt}],
                "max_tokens": max_tokens, "temperature": 0, "stream": True}

    async def stream(self, job: Job) -> AsyncIterator[int]:
        text, counted, aligned = "", 0, False
        async for events in sse_reads(self.client, f"{self.url}/v1/chat/completions", self.body(job)):
            before, finished = len(text), False
            for event in events:
                if "error" in event:
                    raise TargetError(str(event["error"]))
                choice = (event.get("choices") or [{}])[0]
                text += (choice.get("delta") or {}).get("content") or ""
                finished = finished or bool(choice.get("finish_reason"))
            if len(text) > before:  # only a read that brought text is counted (it may re-tokenize all of it)
                now, aligned = self.count(job, text)
                yield max(0, now - counted)
                counted = max(now, counted)
            if finished:
                self.seen.add(job.prompt)
                if aligned and "".join(self.reference[job.prompt]) == text:
                    self.matched.add(job.prompt)
                return
        raise TargetError("the stream ended without a finish_reason")


@dataclass
class EngineStream:
    """The engine in this process (no Ray, no HTTP), fed the prompt ids the ingress would make."""

    name: str
    engine: AsyncEngine
    outputs: dict[str, list[str]] = field(default_factory=dict)  # prompt -> each generated token's text
    eos_after: dict[str, int] = field(default_factory=dict)  # prompt -> tokens before the EOS that ended it

    async def stream(self, job: Job) -> AsyncIterator[int]:
        request = GenerationRequest(uuid.uuid4().hex, job.prompt_ids, SamplingParams(), StoppingParams(job.max_new_tokens))
        texts = self.outputs[job.prompt] = []
        async for events in self.engine.generate(request):
            last = events[-1]
            if isinstance(last, ErrorEvent):
                raise TargetError(f"{last.error_type}: {last.message}")
            if last.finish is not None and last.finish.reason == FinishReason.EOS_TOKEN:
                self.eos_after[job.prompt] = last.finish.generated_tokens - 1
            tokens = [e.token for e in events if isinstance(e, TokenEvent) and not e.token.special]
            texts += [t.text for t in tokens]
            yield len(tokens)


@contextlib.asynccontextmanager
async def engine_target(config: Config) -> AsyncIterator[EngineStream]:
    if config.torch_threads:  # as a NeuronBatcher replica sets itself up
        import torch

        torch.set_num_threads(config.torch_threads)
    engine = AsyncEngine(build_engine(config), stream_interval=config.stream_interval)  # as a batcher runs it
    engine.start()
    try:
        yield EngineStream("engine", engine)
    finally:
        engine.stop()


@contextlib.asynccontextmanager
async def http_target(kind, name: str, url: str, **extra) -> AsyncIterator[Target]:
    # aiohttp rather than httpx: it reads a stream for about a third of the CPU, which on a small host
    # is CPU the server under test gets back
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=60, sock_read=300),
                                     connector=aiohttp.TCPConnector(limit=0), read_bufsize=2**20) as client:
        yield kind(name, url.rstrip("/"), client, **extra)


# -- the load loop ---------------------------------------------------------------------------------


async def drive(target: Target, job: Job, record: Record, due: float | None = None) -> None:
    """Runs one job; its latencies count from `due`, when the open loop's schedule said to send it (a
    send the client itself delayed is the server's latency as a user sees it), else from now."""
    record.start = time.perf_counter() if due is None else due
    try:
        async for tokens in target.stream(job):
            if tokens:
                record.chunks.append((time.perf_counter(), tokens))
    except (TargetError, aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:  # ValueError: bad JSON
        record.error = f"{type(e).__name__}: {e}"
    record.end = time.perf_counter()


async def run_load(target: Target, jobs: list[Job], concurrency: int | None = None, rate: float | None = None,
                   quiet: bool = False) -> Run:
    """Closed loop (`concurrency` streams, each sends its next job when one ends) or open loop (`rate`)."""
    records = [Record() for _ in jobs]
    label = f"{target.name}, " + (f"{concurrency} streams" if rate is None else f"{rate} requests/s")
    bar = tqdm(total=len(jobs), desc=label, file=sys.stderr, leave=False, disable=quiet)

    async def one(i: int, due: float | None = None) -> None:
        await drive(target, jobs[i], records[i], due)
        bar.update()

    start = time.perf_counter()
    if rate is None:
        queue = iter(range(len(jobs)))

        async def stream() -> None:
            for i in queue:
                await one(i)

        await asyncio.gather(*(stream() for _ in range(concurrency)))
    else:
        tasks = []
        for i, job in enumerate(jobs):
            due = start + job.arrival / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(one(i, due)))
        await asyncio.gather(*tasks)
    bar.close()
    return Run(target.name, None if rate else concurrency, rate, records, time.perf_counter() - start)


async def warm_up(target: Target, jobs: list[Job]) -> None:
    """Two requests, one at a time, before anything is measured: a server may load lazily."""
    await run_load(target, jobs[:2], concurrency=1, quiet=True)


def measure(open_target, jobs: list[Job], levels: list[int] = (), rates: list[float] = (),
            per_stream: int | None = None, keep=None) -> list[Run]:
    """Warm the target up, then one run per rate (all jobs), or per concurrency level: on the first
    `per_stream` x streams jobs (at least MIN_REQUESTS), or on all when `per_stream` is None."""

    async def main() -> list[Run]:
        async with open_target() as target:
            await warm_up(target, jobs)
            if keep is not None:
                keep.append(target)
            if rates:
                return [await run_load(target, jobs, rate=r) for r in rates]
            return [await run_load(target, jobs if per_stream is None else jobs[: closed_loop_requests(per_stream, c)],
                                   concurrency=c)
                    for c in levels]

    return asyncio.run(main())


# -- report ----------------------------------------------------------------------------------------


def print_table(runs: list[Run]) -> None:
    print(f"{'target':28} {'load':>9} {'reqs':>5} {'errs':>5} {'req/s':>7} {'tok/s':>8}  "
          f"{'TTFT ms p50/p90/p99':>20}  {'ITL ms p50/p90/p99':>18}  {'e2e ms p50/p90/p99':>20}")
    for run in runs:
        s = run.summary()
        cols = ["/".join("-" if v is None else f"{v:.0f}" if v >= 100 else f"{v:.1f}" for v in s[k].values())
                for k in ("ttft_ms", "itl_ms", "e2e_ms")]
        load = f"c={run.concurrency}" if run.rate is None else f"{run.rate}/s"
        print(f"{run.target:28} {load:>9} {s['requests']:5} {s['errors']:5} {s['req_s']:7.2f} {s['tok_s']:8.1f}  "
              f"{cols[0]:>20}  {cols[1]:>18}  {cols[2]:>20}")
        for error in s.get("first_errors", []):
            print(f"    error: {error}")


def plot(runs: list[Run], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for name in dict.fromkeys(r.target for r in runs):
        mine = [r for r in runs if r.target == name]
        xs = [r.concurrency if r.rate is None else r.rate for r in mine]
        axes[0][0].plot(xs, [r.summary()["tok_s"] for r in mine], "o-", label=name)
        latencies = mine[-1].latencies()
        for ax, metric in zip(axes.flat[1:], ("ttft", "itl", "e2e")):  # CDFs at the heaviest load
            values = sorted(v * 1000 for v in latencies[metric])
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=f"{name} ({xs[-1]})")
            ax.set(title=f"{metric.upper()} CDF", xlabel="ms", ylabel="fraction of requests (ITL: tokens)", xscale="log")
    axes[0][0].set(title="token throughput", xlabel="requests/s" if runs[0].rate else "concurrent streams", ylabel="tokens/s")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def median(values: list[float | None]) -> float | None:
    """The median of the values that were measured (not None); None if none was."""
    measured = [v for v in values if v is not None]
    return round(statistics.median(measured), 3) if measured else None


def verdict(name: str, value: float | None, at_most: bool = False, failed: int = 0) -> str:
    """`failed`: requests that failed in the runs behind `value`, which then meets no target."""
    if value is None:
        return f"{name}: not measured"
    met = value <= TARGETS[name] if at_most else value >= TARGETS[name]
    outcome = f"NOT met: {failed} requests failed" if failed else "met" if met else "NOT met"
    return f"{name}: {value} (target {'<=' if at_most else '>='} {TARGETS[name]}: {outcome})"


def cpu_seconds_by_role() -> dict[str, float]:
    """CPU seconds used so far by this process and its descendants (Ray workers by process title)."""
    import psutil

    # "proxy": HAProxy, the actor that runs it, and Serve's Python proxy (HAProxy's fallback)
    roles = {"haproxy": "proxy", "HAProxyManager": "proxy", "ProxyActor": "proxy", "Ingress": "ingress",
             "NeuronBatcher": "batchers", "transformers": "transformers serve"}
    me = psutil.Process()
    totals = {"load generator": sum(me.cpu_times()[:2])}
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            title = " ".join(child.cmdline())
            role = next((r for key, r in roles.items() if key in title), "other (Ray, Serve controller)")
            totals[role] = totals.get(role, 0.0) + sum(child.cpu_times()[:2])
    return totals


def cpu_seconds_since(before: dict[str, float]) -> dict[str, float]:
    """CPU seconds each role spent since `before` (a `cpu_seconds_by_role()`)."""
    return {role: seconds - before.get(role, 0.0) for role, seconds in cpu_seconds_by_role().items()}


def cpu_ms_per_token(spent: dict[str, float], runs: list[Run]) -> dict[str, float]:
    """CPU milliseconds each role spent (`spent`, in seconds) per token streamed in these runs."""
    tokens = sum(r.summary()["tokens"] for r in runs)
    return {role: round(1000 * seconds / tokens, 2) for role, seconds in spent.items()}


# -- servers in subprocesses -----------------------------------------------------------------------


_ports_given: set[int] = set()


def free_port() -> int:
    """A port free now, for a process that binds it later: below Linux's ephemeral range (32768 up), where
    outgoing connections and anything asking the kernel for a port cannot take it meanwhile, and above
    Ray's worker ports (10002-19999); never the same one twice."""
    for port in random.sample(range(20000, 32768), 100):
        if port in _ports_given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            _ports_given.add(port)
            return port
    raise RuntimeError("no free port in 20000-32767")


# HAProxy's side ports (stats, Prometheus, Serve's fallback proxy) are fixed by default (8404, 9101, ...): each
# cluster the bench starts takes free ones, so that a `serve run` already on this machine (`make serve`) does
# not keep its HAProxy from starting.
HAPROXY_SIDE_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                      "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")


def haproxy_side_ports() -> dict[str, str]:
    """Free ports for HAProxy's side ports, as environment variables for the processes of a cluster."""
    return {name: str(free_port()) for name in HAPROXY_SIDE_PORTS}


def wait_healthy(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (process is None or process.poll() is None):
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=10).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{url}/health did not answer 200 in {timeout:.0f}s (exit code {process and process.poll()})")


@contextlib.contextmanager
def server(cmd: list[str], url: str, log: Path, env: dict[str, str] | None = None):
    """`cmd` in its own process group while the block runs; then Ctrl-C, and SIGKILL a minute later. What it
    started outside its group goes too: Serve's HAProxy runs in a session of its own, and at times outlived
    its `serve run`, serving on and holding its ports."""
    import psutil

    with log.open("w") as out:
        process = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_healthy(url, 600, process)
            yield
        finally:
            started = []
            with contextlib.suppress(psutil.Error):  # gone already: `wait_healthy` saw it exit
                started = psutil.Process(process.pid).children(recursive=True)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            for child in started:
                with contextlib.suppress(psutil.Error):
                    child.kill()  # psutil's kill leaves alone a process that took the pid of one gone


def pass_through_model(model_dir: Path, into: Path) -> Path:
    """The same model files, with a chat template of BOS + the user's text, so that a chat route sees
    the prompt ids `/generate_stream` does."""
    for f in model_dir.iterdir():
        if f.name not in ("chat_template.jinja", "tokenizer_config.json"):
            (into / f.name).symlink_to(f.resolve())
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (into / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (into / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[-1]['content'] }}")
    return into


def last_error_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if "Error" in line]
    return lines[-1][:200] if lines else "nothing logged"


# -- modes -----------------------------------------------------------------------------------------


def floor_apps(wait_ms: float) -> list[dict]:
    """The floor under the idle TTFT, an app shaped like ours that does nothing (deployments/floor.py), twice:
    answering at once at `/`, and at `/waiting` after `wait_ms` in its second deployment."""
    return [{"name": "floor", "route_prefix": "/", "import_path": "deployments.floor:app"},
            {"name": "floor-waiting", "route_prefix": "/waiting", "import_path": "deployments.floor:build_app",
             "args": {"wait_ms": wait_ms}}]


@contextlib.contextmanager
def serve_running(serve_config: dict, tmp: Path, log: Path):
    """`serve run` on a copy of serve_config.yaml listening on a free local port; yields its URL."""
    port = free_port()
    serve_config = {**serve_config, "http_options": {**serve_config["http_options"], "host": "127.0.0.1", "port": port}}
    (tmp / "serve_config.yaml").write_text(yaml.safe_dump(serve_config))
    url = f"http://127.0.0.1:{port}"
    env = {"RAY_ADDRESS": "local", **haproxy_side_ports()}
    with server([str(BIN / "serve"), "run", str(tmp / "serve_config.yaml")], url, log, env=env):
        yield url


@dataclass
class Pair:
    """One round at one load: the engine's run and serve run's, seconds apart."""

    engine: Run
    serve: Run


@dataclass
class Alternation:
    pairs: dict[int, list[Pair]]  # concurrency -> its rounds
    serve_cpu_ms_per_token: dict[str, float]  # by role, over the serve runs
    background_cpus: float  # CPUs serve run's idle processes used while the engine ran


def alternate(open_engine, open_serve, jobs: list[Job], levels: list[int], per_stream: int, rounds: int,
              keep: list) -> Alternation:
    """The engine and the served path in turns: at each level, `rounds` pairs of runs, seconds apart, in
    ABBA order. This host's speed drifts by 10-20% over minutes, so sweeps minutes apart compare the
    drift as much as the two paths; a ratio within each pair does not. `keep` gets the engine target."""

    async def main() -> Alternation:
        async with open_engine() as engine, open_serve() as served:
            keep.append(engine)
            for target in (engine, served):
                await warm_up(target, jobs)
            pairs: dict[int, list[Pair]] = {c: [] for c in levels}
            serve_cpu: dict[str, float] = {}
            background = engine_seconds = 0.0
            for c in levels:
                for i in range(rounds):
                    run = {}
                    for target in (engine, served) if i % 2 == 0 else (served, engine):
                        before = cpu_seconds_by_role()
                        run[target.name] = await run_load(target, jobs[: closed_loop_requests(per_stream, c)],
                                                          concurrency=c)
                        spent = cpu_seconds_since(before)
                        if target is served:
                            for role, seconds in spent.items():
                                serve_cpu[role] = serve_cpu.get(role, 0.0) + seconds
                        else:  # this process is the engine now: the rest is serve run idling
                            background += sum(seconds for role, seconds in spent.items() if role != "load generator")
                            engine_seconds += run[target.name].seconds
                    pairs[c].append(Pair(run[engine.name], run[served.name]))
            serve_runs = [p.serve for rounds_at in pairs.values() for p in rounds_at]
            return Alternation(pairs, cpu_ms_per_token(serve_cpu, serve_runs), round(background / engine_seconds, 3))

    return asyncio.run(main())


def paired_ttft_ms(engine: Run, served: Run) -> float | None:
    """The median over prompts of served TTFT minus the engine's on the same prompt (ms): what the serving
    path adds to a request, without the spread of prefill times across prompts that a difference of two
    p50s carries. Both runs went through the same jobs in order (one record per job)."""
    gaps = [s.ttft() - e.ttft() for e, s in zip(engine.records, served.records)
            if e.error is None and s.error is None and e.chunks and s.chunks]
    return round(statistics.median(gaps) * 1000, 2) if gaps else None


def pooled(runs: list[Run]) -> Run:
    """Several runs of one target at one load as one: their requests together, their seconds summed."""
    return Run(runs[0].target, runs[0].concurrency, runs[0].rate, [r for run in runs for r in run.records],
               sum(run.seconds for run in runs))


def transformers_serve(model: str, tokenizer, engine: EngineStream, probe_job: Job, sweep, out: Path,
                       threads: int | None) -> tuple[list[Run], str, OpenAIChatStream]:
    """`transformers serve` on the same model: with --continuous_batching where it streams tokens, else its default.

    Its torch runs `threads` threads per forward, as a batcher's does (None: torch's default, as a batcher
    below one CPU). With torch's default (one per core) and
    a generate() thread per request, 4 streams on a 16-core host took 43-74 s a request; on 2 cores, 8
    streams gave 259-262 tok/s with one thread against 208-244 with two (alternating runs)."""
    failure, peer = None, []
    for continuous in (True, False):
        port = free_port()
        url, log = f"http://127.0.0.1:{port}", out / f"transformers_serve{'_cb' if continuous else ''}.log"
        cmd = [str(BIN / "transformers"), "serve", "--host", "127.0.0.1", "--port", str(port), "--log_level", "warning"]
        open_peer = lambda: http_target(OpenAIChatStream, "transformers serve", url, model=model,  # noqa: E731
                                        tokenizer=tokenizer, reference=engine.outputs, eos_after=engine.eos_after)
        env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
        with server(cmd + ["--continuous_batching"] * continuous, url, log, env=env):
            probe = measure(open_peer, [probe_job], [1])[0].records[0] if continuous else None
            if probe and (probe.error or not probe.tokens):
                failure = f"{probe.error or 'no tokens streamed'} (server log: {last_error_line(log)})"
                continue
            mode = ("--continuous_batching" if continuous else
                    f"default (one generate() thread per request); --continuous_batching failed: {failure}")
            mode += f"; torch threads {threads or 'torch default'}, as a batcher's"
            return sweep(open_peer, keep=peer), mode, peer[0]


def side_by_side(args) -> tuple[dict, list[Run]]:
    serve_config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    if args.stream_interval:
        serve_config["applications"][0]["args"]["stream_interval"] = args.stream_interval
    config = load_config(serve_config["applications"][0]["args"])
    config = config.model_copy(update={"backend": "torch" if config.backend == "auto" else config.backend})
    batch = config.max_batch_size or DEFAULT_BATCH_SIZE
    levels = args.concurrency or sorted({1, max(1, batch // 2), batch})
    model_dir = resolve_model_dir(config)
    tokenizer = load_tokenizer(model_dir)
    jobs = make_workload(tokenizer, closed_loop_requests(args.per_stream, max(levels)), args.seed, args.prompt_tokens,
                         args.output_tokens)
    def sweep(open_target, keep=None) -> list[Run]:
        return measure(open_target, jobs, levels, per_stream=args.per_stream, keep=keep)

    engine = []
    with tempfile.TemporaryDirectory() as tmp:
        with serve_running(serve_config, Path(tmp), args.out / "serve_run.log") as url:
            turns = alternate(lambda: engine_target(config), lambda: http_target(TGIStream, "serve run (HTTP)", url),
                              jobs, levels, args.per_stream, args.rounds, keep=engine)
        # In a `serve run` of its own, not beside ours: its idle processes would take CPU from the runs above.
        # Waiting as long as the engine takes to its first token, its processes sleep through that as ours
        # sleep through a prefill.
        floors, waiting = [], []
        wait_ms = median([p.engine.summary()["ttft_ms"]["p50"] for p in turns.pairs.get(1, [])])
        if wait_ms is not None:
            with serve_running({**serve_config, "applications": floor_apps(wait_ms)}, Path(tmp),
                               args.out / "serve_run_floor.log") as url:
                wait_healthy(f"{url}/waiting", 600)
                floors = measure(lambda: http_target(TGIStream, "no-op app (HTTP)", url), jobs, [1] * args.rounds,
                                 per_stream=args.per_stream)
                waiting = measure(lambda: http_target(TGIStream, "no-op app + wait (HTTP)", f"{url}/waiting"),
                                  jobs, [1] * args.rounds, per_stream=args.per_stream)
        model = str(pass_through_model(model_dir, Path(tmp)))
        peer_runs, mode, peer = transformers_serve(model, tokenizer, engine[0], jobs[0], sweep, args.out,
                                                   threads=config.torch_threads)
    runs = ([pooled([p.engine for p in turns.pairs[c]]) for c in levels]
            + [pooled([p.serve for p in turns.pairs[c]]) for c in levels]
            + [pooled(measured) for measured in (floors, waiting) if measured] + peer_runs)

    at = {(r.target, r.concurrency): r.summary() for r in runs}
    names = {"engine": "engine", "serve": "serve run (HTTP)", "transformers_serve": "transformers serve"}
    top = {key: at.get((name, batch)) for key, name in names.items()}
    p50 = lambda metric: {k: s and s[metric]["p50"] for k, s in top.items()}  # noqa: E731
    tok_s = {k: s and s["tok_s"] for k, s in top.items()}
    # Each round's figure from its own pair of runs (None where a run had no successful request); the
    # median of the rounds is the result.
    each = lambda c, f: [f(p.engine.summary(), p.serve.summary()) for p in turns.pairs.get(c, [])]  # noqa: E731
    throughput_rounds = each(batch, lambda e, s: ratio(s["tok_s"], e["tok_s"]))
    ttft_rounds = each(1, lambda e, s: None if None in (s["ttft_ms"]["p50"], e["ttft_ms"]["p50"])
                       else round(s["ttft_ms"]["p50"] - e["ttft_ms"]["p50"], 2))
    paired_rounds = [paired_ttft_ms(p.engine, p.serve) for p in turns.pairs.get(1, [])]
    floor_runs = [run.summary()["ttft_ms"]["p50"] for run in floors]
    waiting_runs = [None if t is None else round(t - wait_ms, 2)  # its hops: its TTFT less the wait
                    for t in (run.summary()["ttft_ms"]["p50"] for run in waiting)]
    overhead, floor, waiting_floor = median(ttft_rounds), median(floor_runs), median(waiting_runs)
    failed = lambda c, *keys: sum((at.get((names[k], c)) or {"errors": 0})["errors"] for k in keys)  # noqa: E731
    above = lambda base: None if None in (overhead, base) else round(overhead - base, 2)  # noqa: E731
    summary = {
        "mode": "side-by-side", "model": config.model_id, "batch_size": batch, "concurrency": levels,
        "rounds": args.rounds, "stream_interval": config.stream_interval,
        "transformers_serve_mode": mode,
        "transformers_serve_matched_engine": f"{len(peer.matched)}/{len(peer.seen)}",
        "serve_over_engine": median(throughput_rounds), "serve_over_engine_rounds": throughput_rounds,
        "ours_over_transformers_serve": ratio(tok_s["serve"], tok_s["transformers_serve"]),
        "serve_ttft_overhead_ms": overhead, "serve_ttft_overhead_ms_rounds": ttft_rounds,
        "serve_ttft_overhead_paired_ms": median(paired_rounds), "serve_ttft_overhead_paired_ms_rounds": paired_rounds,
        "floor_ttft_ms": floor, "floor_ttft_ms_runs": floor_runs,
        "serve_ttft_overhead_above_floor_ms": above(floor),
        "floor_wait_ms": wait_ms, "waiting_floor_ms": waiting_floor, "waiting_floor_ms_runs": waiting_runs,
        "serve_ttft_overhead_above_waiting_floor_ms": above(waiting_floor),
        "tok_s": tok_s, "p50_itl_ms": p50("itl_ms"), "p50_tpot_ms": p50("tpot_ms"), "p50_ttft_ms": p50("ttft_ms"),
        "failed_requests": {f"{r.target} @ {r.concurrency}": e for r in runs if (e := r.summary()["errors"])},
        "serve_run_cpu_ms_per_token": turns.serve_cpu_ms_per_token,
        "serve_run_idle_cpus_during_engine_runs": turns.background_cpus,
    }
    print_table(runs)
    print(f"\ntransformers serve mode: {mode}")
    print(f"transformers serve's text = the engine's on {summary['transformers_serve_matched_engine']} prompts "
          "(tokens counted exactly there, by re-tokenizing elsewhere)")
    print(f"engine and serve run in turns: {args.rounds} rounds of each at each load (rows above pool them); "
          f"serve run's idle processes used {turns.background_cpus} CPUs while the engine ran")
    print(f"CPU ms per streamed token in the serve runs ({os.cpu_count()} CPUs here): "
          + ", ".join(f"{k} {v}" for k, v in turns.serve_cpu_ms_per_token.items()))
    print(f"at concurrency {batch} (the batch size):")
    print("  " + verdict("serve_over_engine", summary["serve_over_engine"], failed=failed(batch, "engine", "serve"))
          + f", median of rounds {throughput_rounds}")
    # Tokens handed over in groups arrive in bursts: a group read at once has its gap spread over its tokens,
    # one split across reads has gaps of ~0. TPOT, over the whole request, is blind to both: the fair figure then.
    per_token = "p50_itl_ms" if config.stream_interval == 1 else "p50_tpot_ms"
    ours, theirs = summary[per_token]["serve"], summary[per_token]["transformers_serve"]
    lower = ours is not None and theirs is not None and ours < theirs
    print("  " + verdict("ours_over_transformers_serve", summary["ours_over_transformers_serve"],
                         failed=failed(batch, "serve", "transformers_serve"))
          + f", with {'a lower' if lower else 'NOT a lower'} {per_token[:-3].replace('_', ' ')}")
    for metric in ("p50_itl_ms", "p50_tpot_ms", "p50_ttft_ms"):
        print(f"  {metric}: " + ", ".join(f"{k} {v}" for k, v in summary[metric].items()))
    print("idle (1 stream): " + verdict("serve_ttft_overhead_ms", summary["serve_ttft_overhead_ms"], at_most=True,
                                        failed=failed(1, "engine", "serve"))
          + f", median of rounds {ttft_rounds}")
    print(f"  per prompt (serve minus engine on the same prompt, the median over prompts): "
          f"{summary['serve_ttft_overhead_paired_ms']} ms, median of rounds {paired_rounds}")
    print(f"  the floor: a no-op app on the same hops (deployments/floor.py: HAProxy, an ingress deployment, a Serve "
          f"call to a second deployment and back), served right after ours: TTFT {floor} ms, median of runs {floor_runs}; "
          f"ours adds {summary['serve_ttft_overhead_above_floor_ms']} ms above it")
    print(f"  the same, its second deployment waiting {wait_ms} ms (the engine's p50 TTFT here) as a batcher waits "
          f"for a prefill: its hops cost {waiting_floor} ms (TTFT less the wait), median of runs {waiting_runs}; "
          f"ours adds {summary['serve_ttft_overhead_above_waiting_floor_ms']} ms above it")
    return summary, runs


def fleet_scaling(single: dict, fleets: dict[int, dict], replicas: int, streams: int):
    """Each fleet's throughput over `replicas` times the single replica's (by ingress replicas), the streams each
    lost, the best fleet, and why there is no `fleet_over_linear` (None when there is). Only a run that lost no
    stream counts: a failed request's time counts and its tokens do not, so errors in the single replica's run
    would flatter every fleet, and a fleet that lost streams has not served the load."""
    over_linear = {i: ratio(s["tok_s"], replicas * single["tok_s"]) for i, s in fleets.items()}
    lost = {i: streams - (s["requests"] - s["errors"]) for i, s in fleets.items()}
    complete = [i for i in fleets if lost[i] == 0]
    best = max(complete or fleets, key=lambda i: over_linear[i] or 0)
    if single["errors"]:
        return over_linear, lost, best, f"the single replica's run had {single['errors']} errors"
    if not complete:
        return over_linear, lost, best, "every fleet lost streams"
    return over_linear, lost, best, None


def simulate(args) -> tuple[dict, list[Run]]:
    from neuron_serve.instances import lookup

    os.environ["RAY_AUTH_MODE"] = "disabled"  # the driver and its cluster must agree (see tests/serve/conftest.py)
    import ray
    from ray import serve

    from deployments.app import build_app

    cores, group, batch = lookup(args.simulate).cores, 2, args.batch
    replicas = cores // group
    base = {"model_id": args.model, "backend": "simulated", "cores_per_replica": group, "max_batch_size": batch,
            "max_total_tokens": 1024, "max_input_tokens": 512, "simulated_params": args.params,
            "replica_cpus": 0.1, "max_concurrent_requests": 2 * args.streams, "stream_interval": args.stream_interval or 1}
    jobs = make_workload(load_tokenizer(resolve_model_dir(Config(model_id=args.model))), args.streams, args.seed,
                         args.prompt_tokens, args.output_tokens)
    port = free_port()
    os.environ.update(haproxy_side_ports())  # the cluster's processes inherit this process's environment
    ray.init(address="local", num_cpus=8, resources={"neuron_cores": cores}, include_dashboard=False,
             logging_level="ERROR", log_to_driver=False)
    runs, cpu = [], {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port},  # Serve as `serve run serve_config.yaml` starts it
                    controller_options=yaml.safe_load((ROOT / "serve_config.yaml").read_text())["controller_options"])

        def deploy(name: str, app_args: dict) -> str:
            serve.run(build_app(app_args), name=name, route_prefix=f"/{name}")
            wait_healthy(f"http://127.0.0.1:{port}/{name}", 300)
            return f"http://127.0.0.1:{port}/{name}"

        # One replica kept full (its rows and a queue as deep), through as many waves of requests as each fleet replica.
        url = deploy("one", {**base, "num_replicas": 1})
        # Every `replicas`-th job: a sample of the fleet's whole workload (its first jobs' lengths may not be).
        sample = jobs[::replicas][: args.streams // replicas]
        runs += measure(lambda: http_target(TGIStream, "1 replica", url), sample, [2 * batch])
        serve.delete("one")
        for ingress in args.ingress_replicas:  # a fresh app each time: a redeploy would roll replicas mid-run
            url = deploy(f"fleet{ingress}", {**base, "ingress_replicas": ingress})
            before = cpu_seconds_by_role()
            name = f"{replicas} replicas, {ingress} ingress"
            runs += measure(lambda: http_target(TGIStream, name, url), jobs, [args.streams])
            cpu[ingress] = cpu_ms_per_token(cpu_seconds_since(before), runs[-1:])
            serve.delete(f"fleet{ingress}")
    finally:
        serve.shutdown()
        ray.shutdown()

    single = runs[0].summary()["tok_s"]
    fleets = {ingress: run.summary() for ingress, run in zip(args.ingress_replicas, runs[1:])}
    over_linear, lost, best, why_not = fleet_scaling(runs[0].summary(), fleets, replicas, args.streams)
    fleet_over_linear = None if why_not else over_linear[best]
    # A Serve process is one Python interpreter: about one core. Its CPU per token gives the rate that fills it.
    ms = cpu[best]
    serving = sum(v for k, v in ms.items() if k != "load generator")
    ceilings = {"proxy": round(1000 / ms.get("proxy", 1e-9)), "ingress replica": round(1000 / ms.get("ingress", 1e-9)),
                f"serving path on this host's {os.cpu_count()} CPUs": round(1000 * os.cpu_count() / serving)}
    needed = replicas * single
    where = (f"streaming is CPU-bound: a proxy fills its core at ~{ceilings['proxy']} tok/s, an ingress replica at "
             f"~{ceilings['ingress replica']} tok/s, the whole serving path fills this host at ~{list(ceilings.values())[2]} "
             f"tok/s (and this load generator, one process, its core at "
             f"~{round(1000 / ms.get('load generator', 1e-9))} tok/s); linear ({needed:.0f} tok/s) needs "
             f">= {-(-needed // ceilings['ingress replica']):.0f} ingress "
             f"replica(s) and >= {-(-needed // ceilings['proxy']):.0f} proxy(ies), i.e. nodes (one proxy per node)")
    print_table(runs)
    print(f"\n{args.simulate}: {cores} neuron_cores, {group} per group -> {replicas} replicas of a simulated "
          f"{args.params / 1e9:g}B model at batch {batch}, stream_interval {base['stream_interval']}; "
          f"{args.streams} concurrent streams per fleet run")
    for i, s in fleets.items():
        print(f"  {i} ingress replica(s): {s['requests'] - s['errors']}/{args.streams} streams completed, {lost[i]} lost; "
              f"{s['tok_s']} tok/s = {over_linear[i]} x linear ({replicas} x {single}); "
              f"CPU ms per token: {', '.join(f'{k} {v}' for k, v in cpu[i].items())}")
    print("  " + verdict("fleet_over_linear", fleet_over_linear) + (f" ({why_not})" if why_not else ""))
    print(f"  saturation: {where}")
    summary = {"mode": "simulate", "instance": args.simulate, "replicas": replicas, "streams": args.streams,
               "stream_interval": base["stream_interval"],
               "simulated_params": args.params, "single_replica_tok_s": single, "fleet_over_linear": fleet_over_linear,
               "by_ingress_replicas": {str(i): {"tok_s": fleets[i]["tok_s"], "fleet_over_linear": over_linear[i],
                                                "lost": lost[i], "cpu_ms_per_token": cpu[i]} for i in fleets},
               "saturation_tok_s": ceilings, "saturation": where}
    return summary, runs


def load_test(args) -> tuple[dict, list[Run]]:
    tokenizer = load_tokenizer(resolve_model_dir(Config(model_id=args.model)))
    levels = args.concurrency or [1, 8, 32]
    jobs = make_workload(tokenizer, args.requests or closed_loop_requests(args.per_stream, max(levels)), args.seed,
                         args.prompt_tokens, args.output_tokens)
    if args.engine:
        config = load_config({"model_id": args.model, "max_batch_size": args.batch, "backend": "torch"})
        open_target = lambda: engine_target(config)  # noqa: E731
    elif args.api == "tgi":
        open_target = lambda: http_target(TGIStream, args.url, args.url)  # noqa: E731
    else:
        open_target = lambda: http_target(OpenAIChatStream, args.url, args.url,  # noqa: E731
                                          model=args.openai_model or args.model, tokenizer=tokenizer)
    runs = measure(open_target, jobs, levels, args.rate or (), None if args.requests else args.per_stream)
    print_table(runs)
    return {"mode": "engine" if args.engine else args.api}, runs


def main(argv: list[str] | None = None) -> None:
    span = lambda text: tuple(int(x) for x in (text + ":" + text).split(":")[:2])  # noqa: E731  "16:256" or "64"
    numbers = lambda kind: lambda text: [kind(x) for x in text.split(",")]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--url", help="a TGI-compatible server (ours or TGI), e.g. http://localhost:8000")
    what.add_argument("--engine", action="store_true", help="the engine in this process (no Ray, no HTTP)")
    what.add_argument("--side-by-side", action="store_true", help="engine alone, serve run, transformers serve")
    what.add_argument("--simulate", metavar="INSTANCE", help="a simulated fleet on this instance type's NeuronCores")
    parser.add_argument("--api", choices=["tgi", "openai"], default="tgi",
                        help="--url: /generate_stream or /v1/chat/completions")
    parser.add_argument("--openai-model", help="--api openai: the request's `model` (default: --model)")
    parser.add_argument("--model", default=Config().model_id, help="the tokenizer's (and --engine's) model")
    parser.add_argument("--concurrency", type=numbers(int), help="closed loop: concurrent streams, e.g. 1,8,32")
    parser.add_argument("--rate", type=numbers(float), help="open loop: Poisson request rates per second, e.g. 2,4")
    parser.add_argument("--requests", type=int, help=f"requests per run (default: --per-stream x streams, at least {MIN_REQUESTS})")
    parser.add_argument("--per-stream", type=int, default=4, help="closed loop: requests per stream")
    parser.add_argument("--prompt-tokens", type=span, default=(16, 256), help="uniform range, e.g. 16:256")
    parser.add_argument("--output-tokens", type=span, help="max_new_tokens range (default 32:128, --simulate 16:64)")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH_SIZE, help="--engine, --simulate: batch size")
    parser.add_argument("--streams", type=int, default=1000, help="--simulate: concurrent streams")
    parser.add_argument("--params", type=float, default=8e9, help="--simulate: the simulated model's parameters")
    parser.add_argument("--ingress-replicas", type=numbers(int), default=[1, 2],
                        help="--simulate: ingress replica counts to compare")
    parser.add_argument("--stream-interval", type=int,
                        help="--side-by-side, --simulate: the batchers' stream_interval (default: serve_config.yaml's, or 1)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="--side-by-side: runs of the engine and of serve run, in turns, at each load")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results", help="where the PNG, JSON and server logs go")
    args = parser.parse_args(argv)
    if args.stream_interval is not None and args.stream_interval < 1:
        parser.error("--stream-interval must be >= 1")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    args.output_tokens = args.output_tokens or ((16, 64) if args.simulate else (32, 128))
    args.out.mkdir(parents=True, exist_ok=True)

    mode = "side-by-side" if args.side_by_side else "simulate" if args.simulate else "engine" if args.engine else "url"
    summary, runs = {"side-by-side": side_by_side, "simulate": simulate}.get(mode, load_test)(args)
    summary["png"] = str(args.out / f"bench-{mode}.png")
    plot(runs, Path(summary["png"]), f"scripts/bench.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    summary["runs"] = [r.summary() for r in runs]
    (args.out / f"bench-{mode}.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
