"""The load generator (`scripts/bench.py`): its summary math, its two loops, and a run on the engine
ending with the JSON summary (figures are not judged here)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..conftest import load_script

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    return load_script("bench")


def test_percentile_interpolates_between_ranks(bench):
    assert bench.percentile([], 50) is None
    assert bench.percentile([7.0], 99) == 7.0
    assert bench.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert bench.percentile(list(range(101)), 90) == 90
    assert bench.percentile([0.0, 10.0], 99) == pytest.approx(9.9)


def test_median_of_rounds_skips_rounds_not_measured(bench):
    assert bench.median([0.9, None, 0.8, 1.0]) == 0.9
    assert bench.median([None, None]) is None and bench.median([]) is None


def test_summary_of_a_run(bench):
    ok = bench.Record(start=0.0, end=1.0, chunks=[(0.2, 1), (0.4, 1), (1.0, 3)])  # a chunk of 3 tokens: 3 ITLs of 0.2
    slow = bench.Record(start=0.5, end=2.5, chunks=[(1.5, 1), (2.5, 1)])
    failed = bench.Record(start=0.0, end=0.1, chunks=[(0.05, 1)], error="TargetError: overloaded")
    assert ok.tokens == 5 and ok.itls() == pytest.approx([0.2, 0.2, 0.2, 0.2])
    s = bench.Run("t", 2, None, [ok, slow, failed], seconds=2.0).summary()
    assert (s["requests"], s["errors"], s["tokens"]) == (3, 1, 7)
    assert s["req_s"] == 1.0 and s["tok_s"] == 3.5
    assert s["ttft_ms"]["p50"] == pytest.approx(600.0)  # 200 and 1000 ms; the failed request does not count
    assert s["itl_ms"]["p50"] == pytest.approx(200.0) and s["itl_ms"]["p99"] == pytest.approx(968.0)
    assert s["e2e_ms"] == {"p50": 1500.0, "p90": 1900.0, "p99": 1990.0}
    # TPOT per request, after the first token: (1.0 - 0.2) / 4 and (2.5 - 1.5) / 1
    assert ok.tpot() == pytest.approx(0.2) and s["tpot_ms"]["p50"] == pytest.approx(600.0)
    burst = bench.Record(start=0.0, end=1.0, chunks=[(0.1, 1), (0.5, 1), (0.5, 1), (0.9, 1), (0.9, 1)])
    assert burst.tpot() == pytest.approx(0.2) and sorted(burst.itls())[:2] == [0.0, 0.0]  # bursts: ITL 0, TPOT even
    assert s["first_errors"] == ["TargetError: overloaded"]


def test_paired_ttft_compares_each_prompt_with_itself(bench):
    def run(ttfts, errors=()):
        return bench.Run("t", 1, None, [bench.Record(start=1.0, end=2.0, chunks=[(1.0 + t, 1)],
                                                     error="failed" if i in errors else None)
                                        for i, t in enumerate(ttfts)], seconds=1.0)

    engine = run([0.010, 0.030, 0.020, 0.040])
    served = run([0.014, 0.036, 0.025, 0.090], errors={3})  # the failed request is not compared
    assert bench.paired_ttft_ms(engine, served) == 5.0  # gaps 4, 6 and 5 ms
    assert bench.paired_ttft_ms(engine, run([0.5] * 4, errors={0, 1, 2, 3})) is None


class SleepyTarget:
    """Answers every job with `max_new_tokens` tokens, 10 ms apart; counts requests in flight."""

    name = "sleepy"

    def __init__(self):
        self.in_flight = self.most_in_flight = 0

    async def stream(self, job):
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            for _ in range(job.max_new_tokens):
                await asyncio.sleep(0.01)
                yield 1
        finally:
            self.in_flight -= 1


def jobs(bench, n):
    return [bench.Job(f"prompt {i}", (0, i), 3, arrival=i * 0.5) for i in range(n)]


def test_closed_loop_keeps_n_streams_busy(bench):
    target = SleepyTarget()
    run = asyncio.run(bench.run_load(target, jobs(bench, 9), concurrency=3, quiet=True))
    assert target.most_in_flight == 3 and run.concurrency == 3 and run.rate is None
    assert all(r.error is None and r.tokens == 3 for r in run.records)


def test_open_loop_sends_at_the_arrival_times(bench):
    run = asyncio.run(bench.run_load(SleepyTarget(), jobs(bench, 4), rate=10.0, quiet=True))  # arrivals 0, 50, 100, 150 ms
    starts = [r.start - run.records[0].start for r in run.records]
    # In order, over the schedule's 150 ms (a pause of this process, as a full GC of ~0.2 s, moves one).
    assert starts == sorted(starts) and 0.12 <= starts[-1] < 0.45, starts
    assert run.concurrency is None and run.summary()["tokens"] == 12


def test_open_loop_latency_counts_from_the_schedule_not_the_delayed_send(bench):
    """A client that falls behind its schedule (here, each send holds the event loop 0.1 s, at a request
    every 0.05 s) must not hide that wait: it is latency a user of the server would see."""

    class Blocking:
        name = "blocking"

        async def stream(self, job):
            time.sleep(0.1)  # a client too slow for its rate
            yield 1

    run = asyncio.run(bench.run_load(Blocking(), jobs(bench, 5), rate=10.0, quiet=True))  # due 0, 50, ... 200 ms
    ttfts = [r.chunks[0][0] - r.start for r in run.records]
    assert [round(r.start - run.records[0].start, 3) for r in run.records] == [0.0, 0.05, 0.1, 0.15, 0.2]
    assert ttfts[-1] >= 0.25, ttfts  # sent 0.2 s late, then 0.1 s to its token


def test_events_written_together_count_as_one_piece(bench):
    """A server that hands over k tokens at once (`stream_interval` k) writes k TGI events in one go: they
    count as one piece of k tokens, k ITLs of the gap / k, as the engine's hand-overs do, not one gap and
    k - 1 of zero."""
    from aiohttp import web

    def event(i: int, last: bool = False) -> bytes:
        token = {"id": i, "text": "x", "logprob": 0.0, "special": False}
        return b"data:" + json.dumps({"token": token, "generated_text": "x" * i if last else None}).encode() + b"\n\n"

    async def generate_stream(request):
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(event(1))
        for pieces in ([2, 3, 4], [5, 6, 7]):
            await asyncio.sleep(0.06)
            await response.write(b"".join(event(i, last=i == 7) for i in pieces))  # one write, 3 events
        return response

    async def scenario():
        app = web.Application()
        app.router.add_post("/generate_stream", generate_stream)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            async with bench.http_target(bench.TGIStream, "tgi", f"http://127.0.0.1:{port}") as target:
                return await bench.run_load(target, [bench.Job("p", (0,), 7, arrival=0.0)], concurrency=1, quiet=True)
        finally:
            await runner.cleanup()

    [record] = asyncio.run(scenario()).records
    assert record.error is None and [n for _, n in record.chunks] == [1, 3, 3]
    assert len(record.itls()) == 6 and min(record.itls()) >= 0.015  # each a third of a 60 ms gap, none 0


def test_transformers_serve_computes_with_as_many_threads_as_a_batcher(bench, monkeypatch, tmp_path):
    """torch's default, a thread per core for every forward, with a generate() thread per request, made
    the peer crawl on a 16-core host: it gets a batcher's threads."""
    import types

    started = []

    @contextlib.contextmanager
    def fake_server(cmd, url, log, env=None):
        started.append((cmd, env))
        yield

    streamed = types.SimpleNamespace(records=[types.SimpleNamespace(error=None, tokens=3)])
    monkeypatch.setattr(bench, "server", fake_server)
    monkeypatch.setattr(bench, "measure", lambda *args, **kwargs: [streamed])

    def sweep(open_peer, keep):
        keep.append("the peer")
        return ["its runs"]

    job = bench.Job("p", (0,), 3, arrival=0.0)
    runs, mode, _ = bench.transformers_serve("model", None, bench.EngineStream("engine", None), job, sweep, tmp_path,
                                             threads=bench.Config(backend="torch", replica_cpus=3).torch_threads)
    [(cmd, env)] = started
    assert env == {"OMP_NUM_THREADS": "3"} and cmd[1:2] == ["serve"] and "--continuous_batching" in cmd
    assert runs == ["its runs"] and mode == "--continuous_batching; torch threads 3, as a batcher's"


def test_side_by_side_runs_the_two_paths_in_turns(bench):
    """Engine and serve run alternate at each load, ABBA, and each round's two runs are paired."""
    order = []

    class Logged(SleepyTarget):
        def __init__(self, name):
            super().__init__()
            self.name = name

        async def stream(self, job):
            if job.prompt == "prompt 0":  # every run starts with the first job
                order.append(self.name)
            async for n in super().stream(job):
                yield n

    def opener(name):
        @contextlib.asynccontextmanager
        async def open_target():
            yield Logged(name)
        return open_target

    kept = []
    turns = bench.alternate(opener("engine"), opener("serve"), jobs(bench, bench.MIN_REQUESTS), [1, 2],
                            per_stream=1, rounds=3, keep=kept)
    assert order == ["engine", "serve"] + ["engine", "serve", "serve", "engine", "engine", "serve"] * 2  # warm-up first
    assert [k.name for k in kept] == ["engine"]
    assert sorted(turns.pairs) == [1, 2]
    for c, rounds in turns.pairs.items():
        assert len(rounds) == 3
        assert all(p.engine.target == "engine" and p.serve.target == "serve" and p.engine.concurrency == c
                   for p in rounds)
    pooled = bench.pooled([p.serve for p in turns.pairs[2]])
    assert len(pooled.records) == 3 * bench.MIN_REQUESTS
    assert pooled.seconds == pytest.approx(sum(p.serve.seconds for p in turns.pairs[2]))


def test_openai_text_is_counted_against_the_reference_tokens(bench):
    class CharTokenizer:  # one token per character
        def __call__(self, text, add_special_tokens=False):
            return type("Encoding", (), {"input_ids": list(text)})

    job = bench.Job("p", (0,), 8, 0.0)
    stream = bench.OpenAIChatStream("t", "", None, "m", CharTokenizer(), reference={"p": [" Hello", ",", "", " world"]})
    assert stream.count(job, " Hello,") == (2, True)
    assert stream.count(job, " Hello, world") == (4, True)  # a token with no text counts with the next one
    assert stream.count(job, " Goodbye") == (8, False)  # not the reference's text: re-tokenized


def test_the_peer_is_asked_for_no_more_tokens_than_the_engine_made_before_its_eos(bench):
    """`transformers serve` stops at one EOS id only: a prompt the engine ended at another gets its length."""
    stopped, long = bench.Job("stopped", (0,), 100, 0.0), bench.Job("long", (0,), 100, 0.0)
    stream = bench.OpenAIChatStream("t", "", None, "m", None, eos_after={"stopped": 9, "long": 400})
    assert stream.body(stopped)["max_tokens"] == 9
    assert stream.body(long)["max_tokens"] == 100
    assert stream.body(bench.Job("new", (0,), 100, 0.0))["max_tokens"] == 100


def test_the_engine_target_notes_where_the_eos_ended_a_prompt(bench):
    config = bench.Config(backend="torch")
    tokenizer = bench.load_tokenizer(bench.resolve_model_dir(config))
    # `make bench`'s workload: its 31st prompt ends at an EOS the peer does not stop at (<|end_of_text|>)
    job = bench.make_workload(tokenizer, 32, 0, (16, 256), (32, 128))[30]

    async def run():
        async with bench.engine_target(config) as engine:
            async for _ in engine.stream(job):
                pass
            return engine

    engine = asyncio.run(run())
    assert engine.eos_after == {job.prompt: len(engine.outputs[job.prompt])}
    assert engine.eos_after[job.prompt] < job.max_new_tokens


def test_a_verdict_over_runs_with_failed_requests_is_not_met(bench):
    assert bench.verdict("serve_over_engine", 0.9).endswith("(target >= 0.85: met)")
    assert bench.verdict("serve_over_engine", 0.9, failed=2).endswith("(target >= 0.85: NOT met: 2 requests failed)")
    assert bench.verdict("serve_ttft_overhead_ms", 6.0, at_most=True).endswith("(target <= 5.0: NOT met)")


def test_fleet_over_linear_counts_only_runs_that_lost_no_stream(bench):
    def run(tok_s, requests, errors=0):
        return {"tok_s": tok_s, "requests": requests, "errors": errors}

    single, fleets = run(100.0, 10), {1: run(1000.0, 1000, errors=3), 2: run(960.0, 1000), 3: run(900.0, 1000)}
    over_linear, lost, best, why_not = bench.fleet_scaling(single, fleets, 12, 1000)
    assert over_linear == {1: 0.833, 2: 0.8, 3: 0.75} and lost == {1: 3, 2: 0, 3: 0}
    assert (best, why_not) == (2, None)  # the fastest fleet lost 3 streams
    assert bench.fleet_scaling(single, {1: fleets[1]}, 12, 1000)[3] == "every fleet lost streams"
    assert bench.fleet_scaling(run(100.0, 10, errors=1), fleets, 12, 1000)[3] == "the single replica's run had 1 errors"


def test_bench_on_the_engine_ends_with_the_json_summary(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--engine", "--concurrency", "1,2", "--requests", "4",
         "--prompt-tokens", "8:32", "--output-tokens", "4:8", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["mode"] == "engine" and [r["concurrency"] for r in summary["runs"]] == [1, 2]
    for run in summary["runs"]:
        assert run["requests"] == 4 and run["errors"] == 0
        assert run["tokens"] > 0 and run["tok_s"] > 0 and run["req_s"] > 0
        for metric in ("ttft_ms", "itl_ms", "e2e_ms"):
            assert set(run[metric]) == {"p50", "p90", "p99"} and run[metric]["p50"] > 0
    assert Path(summary["png"]).stat().st_size > 0
    assert json.loads((tmp_path / "bench-engine.json").read_text())["runs"] == summary["runs"]


def test_a_server_stopped_takes_along_what_it_started_in_a_session_of_its_own(bench, tmp_path):
    """As Serve's HAProxy, which at times outlived its `serve run`, serving on and holding its ports."""
    port = bench.free_port()
    escaped = tmp_path / "escaped.pid"
    script = f"""
import http.server, subprocess, sys
child = subprocess.Popen(["sleep", "300"], start_new_session=True)
open({str(escaped)!r}, "w").write(str(child.pid))
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
http.server.HTTPServer(("127.0.0.1", {port}), Health).serve_forever()
"""
    with bench.server([sys.executable, "-c", script], f"http://127.0.0.1:{port}", tmp_path / "server.log"):
        pid = int(escaped.read_text())
        assert Path(f"/proc/{pid}").exists()
    for _ in range(50):
        if not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the server's escaped child {pid} is still running")


def test_each_serve_run_takes_free_haproxy_side_ports(bench, monkeypatch, tmp_path):
    """Not HAProxy's fixed defaults, which a `serve run` already on the machine (`make serve`) holds."""
    seen = []

    @contextlib.contextmanager
    def server(cmd, url, log, env=None):
        seen.append(env)
        yield

    monkeypatch.setattr(bench, "server", server)
    config = {"http_options": {"host": "0.0.0.0", "port": 8000}, "applications": []}
    for _ in range(2):
        with bench.serve_running(config, tmp_path, tmp_path / "serve_run.log"):
            pass
    ports = [env[name] for env in seen for name in bench.HAPROXY_SIDE_PORTS]
    assert len(set(ports)) == 2 * len(bench.HAPROXY_SIDE_PORTS)
    assert not {"8404", "9101"} & set(ports)


def test_a_server_that_exits_before_it_is_healthy_says_so(bench, tmp_path):
    with pytest.raises(RuntimeError, match="did not answer 200"):
        with bench.server([sys.executable, "-c", "pass"], f"http://127.0.0.1:{bench.free_port()}", tmp_path / "log"):
            pass
