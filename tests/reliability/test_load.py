"""Load: clients that drop their streams, twice too many clients, and a client that stops reading."""

from __future__ import annotations

import asyncio
import json
import random
import re
import time

import httpx
import pytest

from ..conftest import logged_line
from .conftest import SIMULATED, all_rows_free, body, replicas, run, stream, streaming, wait_until

pytestmark = pytest.mark.slow


class Drop(Exception):
    """Raised from a token callback: the client walks away mid-stream."""


@pytest.fixture(scope="module")
def fleet(cluster):
    url = cluster.deploy("fleet", {**SIMULATED, "num_replicas": 2, "max_concurrent_requests": 128})
    yield url
    cluster.delete("fleet")


@pytest.fixture(scope="module")
def narrow(cluster):
    url = cluster.deploy("narrow", {**SIMULATED, "num_replicas": 1, "max_concurrent_requests": 8, "sse_keep_alive_s": 0.3})
    yield url
    cluster.delete("narrow")


def test_a_hundred_clients_drop_their_streams_and_nothing_leaks(fleet):
    rng = random.Random(7)
    plans = [(rng.choice(["waiting", "tokens"]), rng.uniform(0, 1.5), rng.randint(1, 60)) for _ in range(100)]

    async def one(client, when: str, delay: float, after_tokens: int):
        def maybe_drop(result):
            if when == "tokens" and len(result.tokens) >= after_tokens:
                raise Drop

        task = asyncio.create_task(stream(client, fleet, body(100), on_token=maybe_drop))
        if when == "waiting":  # gone at a random moment: queued in the ingress, the replica, or mid-stream
            await asyncio.sleep(delay)
            task.cancel()
        try:
            return await task
        except (Drop, asyncio.CancelledError):
            return None

    async def scenario():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=200)) as client:
            return await asyncio.gather(*(one(client, *plan) for plan in plans))

    outcomes = run(scenario())
    assert sum(o is None for o in outcomes) >= 50  # most dropped; the rest finished before their drop point
    assert all(o.complete for o in outcomes if o is not None)
    wait_until(lambda: all_rows_free(fleet), 60, what="every row and queue free")

    # Nothing leaked: every row takes work again, and the full concurrency limit is admitted (no stale permit).
    async def full_house():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=200)) as client:
            return await asyncio.gather(*(stream(client, fleet, body(5)) for _ in range(128)))

    results = run(full_house())
    assert [r.status for r in results] == [200] * 128
    assert all(r.complete and len(r.tokens) == 5 for r in results)
    wait_until(lambda: all_rows_free(fleet), 60, what="every row free again")


def test_a_client_gone_before_its_first_token_leaves_the_queue_at_once(narrow):
    """Its request waits for a row behind four long streams when the client hangs up: it leaves the
    replica's queue while they still run, because Serve cancels a request whose client went away (our
    event stream does not listen for that itself)."""
    waiting = lambda: sum(r["waiting"] for r in replicas(narrow))  # noqa: E731

    async def scenario():
        async with httpx.AsyncClient(timeout=120) as client:
            running = await streaming(client, narrow, 4, 1000)  # every row busy for ~17 s
            queued = asyncio.create_task(stream(client, narrow, body(5)))
            await asyncio.to_thread(wait_until, lambda: waiting() == 1, 10, what="the fifth request queued")
            queued.cancel()
            await asyncio.to_thread(wait_until, lambda: waiting() == 0, 3, what="the dropped request gone")
            busy = sum(r["active"] for r in replicas(narrow))
            for task in running:
                task.cancel()
            await asyncio.gather(*running, queued, return_exceptions=True)
            return busy

    assert run(scenario()) == 4  # it left before any row came free
    wait_until(lambda: all_rows_free(narrow), 30, what="every row free")


def test_a_stream_waiting_for_a_row_gets_keep_alive_comments(narrow):
    """As TGI's streams do: an SSE comment after each `sse_keep_alive_s` (0.3 s here) without an event,
    so that a proxy does not close a stream queued behind a full batch. Streams that flow get none."""

    async def scenario():
        async with httpx.AsyncClient(timeout=120) as client:
            running = await streaming(client, narrow, 4, 300)  # every row busy for ~5 s
            lines = []
            async with client.stream("POST", f"{narrow}/generate_stream", json=body(3)) as response:
                async for line in response.aiter_lines():
                    lines.append(line)
            return lines, await asyncio.gather(*running)

    lines, others = run(scenario())
    events = [line for line in lines if line.startswith("data:")]
    first_event = lines.index(events[0])
    assert lines[:first_event].count(":") >= 2, lines[:first_event]
    assert ":" not in lines[first_event:]  # its three tokens came 12 ms apart
    assert len(events) == 3 and json.loads(events[-1][5:])["generated_text"]
    assert all(r.complete and len(r.tokens) == 300 for r in others)


@pytest.mark.parametrize("headers", [{}, {"x-request-disconnect-disabled": "?1"}], ids=["plain", "serve-watch-off"])
def test_a_client_gone_mid_stream_frees_its_row(narrow, headers):
    """Serve cancels the request of a client that hung up, and the engine frees its row at the next step,
    long before its 1000 tokens (~17 s) would have ended it. So does the app where the client turned
    Serve's watch off with Serve's own header."""
    with httpx.Client(timeout=60, headers=headers) as client:
        with client.stream("POST", f"{narrow}/generate_stream", json=body(1000)) as response:
            seen = [line for line, _ in zip(response.iter_lines(), range(12)) if line.startswith("data:")]
            assert len(seen) >= 2
        gone = time.monotonic()
    wait_until(lambda: all_rows_free(narrow), 8, what="its row free")
    line = logged_line(response.headers["x-request-id"], "request cancelled:", "narrow")
    assert re.search(r"output_tokens=\d+", line), line
    print(f"disconnect: the row was free {time.monotonic() - gone:.2f}s after the client hung up")


def test_twice_the_concurrency_limit_is_refused_at_once_and_the_rest_complete(narrow):
    """16 at once against a limit of 8: streams and plain requests alike. As in TGI, a refused
    /generate is an HTTP 429 and a refused /generate_stream is one `overloaded` event."""
    overloaded = {"error": "Model is overloaded", "error_type": "overloaded"}

    async def timed_stream(client):
        started = time.monotonic()
        r = await stream(client, narrow, body(150))
        return ("refused" if r.errors == [overloaded] else "complete" if r.complete and len(r.tokens) == 150
                else r), r.final and r.final["generated_text"], time.monotonic() - started

    async def timed_generate(client):
        started = time.monotonic()
        r = await client.post(f"{narrow}/generate", json=body(150, details=True))
        outcome = ("refused" if r.status_code == 429 and r.json() == overloaded else
                   "complete" if r.status_code == 200 and r.json()["details"]["generated_tokens"] == 150 else r)
        return outcome, r.status_code == 200 and r.json()["generated_text"], time.monotonic() - started

    async def scenario():
        async with httpx.AsyncClient(timeout=120) as client:
            calls = [timed_stream(client) if i % 2 else timed_generate(client) for i in range(16)]
            return await asyncio.gather(*calls)

    outcomes = run(scenario())
    assert sorted(o for o, _, _ in outcomes) == ["complete"] * 8 + ["refused"] * 8, outcomes
    refused = [t for o, _, t in outcomes if o == "refused"]
    admitted = [t for o, _, t in outcomes if o == "complete"]
    assert max(refused) < min(admitted)  # every refusal came back before any admitted request finished
    assert len({text for o, text, _ in outcomes if o == "complete"}) == 1  # same prompt, same tokens


def test_a_client_that_stops_reading_does_not_stall_the_others(narrow):
    """The slow stream's events wait in buffers; its batch-mates stream on, and it loses nothing."""
    payload = body(900, top_n_tokens=5, details=True)  # ~0.5 MB of events: more than socket buffers hold
    with httpx.Client(timeout=120) as slow_client:
        with slow_client.stream("POST", f"{narrow}/generate_stream", json=payload) as slow:
            lines = slow.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))  # then it stops reading

            async def others():
                async with httpx.AsyncClient(timeout=120) as client:
                    return await asyncio.gather(*(stream(client, narrow, body(100)) for _ in range(3)))

            started = time.monotonic()
            results = run(others())
            others_s = time.monotonic() - started
            assert all(r.complete and len(r.tokens) == 100 for r in results)
            rest = [line for line in lines if line.startswith("data:")]
    assert len(rest) == 899 and '"generated_text":"' in rest[-1]
    print(f"slow client: three 100-token streams finished in {others_s:.1f}s while a 900-token stream went unread")


def test_a_failed_prompt_of_a_completions_batch_stops_the_others(narrow):
    """TGI answers a /v1/completions batch with its first error and drops the other prompts; they must
    not go on generating (holding rows and permits) for an answer nobody will read."""
    long = "Once upon a time"
    too_long = "word " * 300  # over max_input_tokens (128)
    r = httpx.post(f"{narrow}/v1/completions", json={"prompt": [long, too_long], "max_tokens": 400}, timeout=60)
    assert r.status_code == 422 and "must have less than 128 tokens" in r.json()["error"]
    wait_until(lambda: all_rows_free(narrow), 3, what="the long prompt's row free")  # alone it would take ~7 s


def metric(url: str, name: str) -> float | None:
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return None


def test_under_saturation_the_queue_is_counted_and_health_stays_up(fleet):
    """Two batchers of 4 rows take 8 requests each (4 running, 4 in their own queue); Serve holds the
    rest. TGI's queue gauge and queue time count those too, as TGI's router queue would hold them. And
    /health stays 200: a batcher with all the requests it takes holds a probe as well, so the tokens
    flowing through the ingress are the proof. /info, whose question such a batcher holds too, lists the
    batchers' last answers, with the time each was given."""
    idle = {r["replica"]: r for r in replicas(fleet)}
    assert len(idle) == 2 and all(time.time() - 30 < r["as_of"] <= time.time() for r in idle.values())

    async def scenario():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=100)) as client:
            started: set[int] = set()  # the streams that have a token
            streams = [asyncio.create_task(stream(client, fleet, body(1000), on_token=lambda r, i=i: started.add(i)))
                       for i in range(28)]  # 8 rows busy for ~17 s, at most 8 in the batchers' queues
            await asyncio.sleep(2)
            health = await client.get(f"{fleet}/health")
            saturated = {r["replica"]: r for r in (await client.get(f"{fleet}/info")).json()["replicas"]}
            assert saturated == idle  # neither could answer: the answers of before, as they were
            # Every stream with no token yet, wherever it waits (Ray exports every 10 s).
            queued = await asyncio.to_thread(
                wait_until, lambda: metric(fleet, "tgi_queue_size") == 28 - len(started) and 28 - len(started),
                30, interval=1, what="tgi_queue_size = the streams with no token yet")
            for task in streams:
                task.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
            return health, queued

    health, queued = run(scenario())
    assert health.status_code == 200 and queued >= 20  # more than the batchers hold: Serve's queue is in it
    wait_until(lambda: all_rows_free(fleet), 60, what="every row free")

    # A request that waited in Serve's queue: its x-queue-time counts that wait too.
    async def late_request():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=100)) as client:
            # 20 streams of 300 tokens ahead of it (~4 s a wave of 8): more than the batchers take.
            running = [asyncio.create_task(stream(client, fleet, body(300))) for _ in range(20)]
            await asyncio.sleep(1)
            r = await client.post(f"{fleet}/generate", json=body(5))  # waits in Serve's queue, then a batcher's
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            return r

    r = run(late_request())
    assert r.status_code == 200, r.text
    total, validation, queue, inference = (
        int(r.headers[f"x-{h}-time"]) for h in ("total", "validation", "queue", "inference"))
    # Two waves or more before its prefill, all of it queue time: what is left is hops of a few ms (the
    # engine's queue alone would leave its wait in Serve's queue out).
    assert queue > 5000 and 0 <= total - validation - queue - inference < 1000, r.headers
    wait_until(lambda: all_rows_free(fleet), 60, what="every row free again")
