"""Faults: a replica killed mid-stream, a forward that fails, a backend broken for good."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from ..conftest import logged_line
from .conftest import SIMULATED, StreamResult, all_rows_free, body, replicas, run, stream, streaming, wait_until

pytestmark = pytest.mark.slow


def batcher(app: str):
    from ray import serve

    return serve.get_deployment_handle("NeuronBatcher", app_name=app)


def batcher_tags(app: str) -> list[str]:
    """The replica tags of `app`'s live batchers, from Ray's named actors (no call that a busy replica holds)."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#NeuronBatcher#"
    return [a["name"][len(prefix):] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].startswith(prefix)]


def kill_replica(app: str, tag: str) -> None:
    import ray

    ray.kill(ray.get_actor(f"SERVE_REPLICA::{app}#NeuronBatcher#{tag}", namespace="serve"), no_restart=True)


@pytest.fixture(scope="module")
def pair(cluster):
    url = cluster.deploy("pair", {**SIMULATED, "num_replicas": 2, "max_concurrent_requests": 64})
    yield url
    cluster.delete("pair")


@pytest.fixture(scope="module")
def single(cluster):
    url = cluster.deploy("single", {**SIMULATED, "num_replicas": 1, "fault_injection": True})
    yield url
    cluster.delete("single")


@pytest.fixture(scope="module")
def stalling(cluster):
    url = cluster.deploy("stalling", {**SIMULATED, "num_replicas": 1, "fault_injection": True, "step_timeout_s": 2,
                                      "graceful_shutdown_timeout_s": 2})
    yield url
    cluster.delete("stalling")


@pytest.fixture(scope="module")
def one_row(cluster):
    url = cluster.deploy("onerow", {**SIMULATED, "num_replicas": 1, "max_batch_size": 1, "max_queued_per_replica": 1})
    yield url
    cluster.delete("onerow")


def test_replica_killed_mid_stream(pair):
    """Its streams end with one error event; others complete; newcomers are served; it comes back."""

    async def scenario():
        async with httpx.AsyncClient(timeout=120) as client:
            long_streams = [asyncio.create_task(stream(client, pair, body(300))) for _ in range(8)]
            busy = await asyncio.to_thread(
                wait_until, lambda: [r for r in replicas(pair) if r["active"] > 0] if len(
                    [r for r in replicas(pair) if r["active"] > 0]) == 2 else None, 60, what="both replicas busy")
            victim = max(busy, key=lambda r: r["active"])["replica"]
            killed_at = time.monotonic()
            kill_replica("pair", victim)
            newcomers = [asyncio.create_task(stream(client, pair, body(20))) for _ in range(6)]
            done = await asyncio.wait_for(asyncio.gather(*long_streams, *newcomers), timeout=120)
            return victim, killed_at, done[:8], done[8:]

    victim, killed_at, long_results, newcomer_results = run(scenario())
    assert all(r.complete or r.failed_cleanly for r in long_results), long_results
    failed = [r for r in long_results if not r.complete]
    assert failed, "the killed replica was streaming: some streams must have failed"
    for r in failed:
        [error] = r.errors
        assert error["error_type"] == "generation" and "replica" in error["error"]
    assert all(r.complete and len(r.tokens) == 300 for r in long_results if r.complete)
    assert all(r.complete and len(r.tokens) == 20 for r in newcomer_results), newcomer_results

    def replaced():
        tags = [r["replica"] for r in replicas(pair)]
        return len(tags) == 2 and victim not in tags and tags

    tags = wait_until(replaced, 120, what="the killed replica replaced")
    recovery_s = time.monotonic() - killed_at
    print(f"recovery: a killed replica was replaced and healthy {recovery_s:.1f}s after the kill")
    # The new replica serves: enough concurrent requests reach both.
    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(stream(client, pair, body(30)) for _ in range(12)))

    assert all(r.complete for r in run(burst()))
    served = {r["replica"]: r["served"] for r in replicas(pair)}
    assert set(served) == set(tags) and all(n > 0 for n in served.values()), served


def test_a_request_queued_in_a_killed_replica_is_sent_again_and_its_client_sees_nothing(one_row):
    """A replica streams in its one row and holds one request behind it, with no event yet. Killing it fails
    the stream, whose tokens had flowed, with one error event; the queued request is sent again, waits for
    the replica Serve starts in its place, and completes."""
    async def scenario():
        async with httpx.AsyncClient(timeout=180) as client:
            [row] = await streaming(client, one_row, 1, 1000)
            queued = asyncio.create_task(client.post(f"{one_row}/generate", json=body(5)))
            await asyncio.sleep(1.5)  # in the replica's queue, held there past batcher.IN_HAND_AFTER_S
            [tag] = batcher_tags("onerow")
            kill_replica("onerow", tag)
            return await asyncio.wait_for(row, 60), await asyncio.wait_for(queued, 120)

    lost, queued = run(scenario())
    assert lost.failed_cleanly and lost.tokens and lost.errors[0]["error_type"] == "generation", lost
    assert queued.status_code == 200 and queued.json()["generated_text"], queued.text
    logged_line(queued.headers["x-request-id"], "sending it again", "onerow", "Ingress")


def test_a_failed_prefill_fails_only_its_request(single):
    async def scenario():
        async with httpx.AsyncClient(timeout=120) as client:
            [running] = await streaming(client, single, 1, 200)
            await batcher("single").inject_fault.remote("prefill", 1)
            refused = await client.post(f"{single}/generate", json=body(10))
            return refused, await running

    refused, running = run(scenario())
    assert refused.status_code == 424
    assert refused.json() == {"error": "Request failed during generation: InjectedFault: injected prefill fault",
                              "error_type": "generation"}
    line = logged_line(refused.headers["x-request-id"], "request failed:", "single")
    assert "error='Request failed during generation: InjectedFault: injected prefill fault'" in line
    assert running.complete and len(running.tokens) == 200  # it was not in the failed forward
    assert httpx.post(f"{single}/generate", json=body(5), timeout=60).status_code == 200
    wait_until(lambda: all_rows_free(single), 30, what="rows free")


def test_a_failed_decode_fails_its_batch_and_the_replica_keeps_serving(single):
    async def scenario():
        async with httpx.AsyncClient(timeout=120) as client:
            streams = await streaming(client, single, 3, 200)
            await batcher("single").inject_fault.remote("decode", 1)
            return await asyncio.gather(*streams)

    results = run(scenario())
    for r in results:  # all three rows were in the failed decode step
        assert r.failed_cleanly and r.errors[0]["error_type"] == "generation", r
        assert "InjectedFault" in r.errors[0]["error"]
    wait_until(lambda: all_rows_free(single), 30, what="rows free")
    after = httpx.post(f"{single}/generate", json=body(20), timeout=60)
    assert after.status_code == 200 and after.json()["generated_text"]
    assert all(r["healthy"] for r in replicas(single))


def test_a_backend_broken_for_good_is_reported_and_replaced(single):
    [before] = replicas(single)
    batcher("single").inject_fault.remote("any", 10**9).result()
    broken_at = time.monotonic()
    for _ in range(3):  # three failed forwards in a row: the engine calls itself unhealthy
        r = httpx.post(f"{single}/generate", json=body(5), timeout=60)
        assert r.status_code == 424 and r.json()["error_type"] == "generation"
    assert httpx.get(f"{single}/health", timeout=30).status_code == 503

    def replaced():
        found = replicas(single)
        return len(found) == 1 and found[0]["replica"] != before["replica"] and found[0]["healthy"]

    wait_until(replaced, 120, interval=0.5, what="the broken replica replaced")
    wait_until(lambda: httpx.get(f"{single}/health", timeout=30).status_code == 200, 60, what="/health 200")
    print(f"recovery: a broken backend was replaced {time.monotonic() - broken_at:.1f}s after it broke")
    ok = httpx.post(f"{single}/generate", json=body(10), timeout=60)
    assert ok.status_code == 200 and ok.json()["generated_text"]


def test_a_batcher_too_busy_for_the_probe_is_healthy_by_serves_checks(single):
    """A batcher with all the requests it takes (4 rows, 4 queued) holds the /health probe too. When no
    request of this ingress is generating (here its 8 wait through a long prefill; with several ingress
    replicas, another one's requests can fill the batchers), Serve's health checks decide: 200."""

    async def scenario():
        async with httpx.AsyncClient(timeout=120) as client:
            await batcher("single").inject_fault.remote("prefill", 1, stall_s=20)
            streams = [asyncio.create_task(stream(client, single, body(5))) for _ in range(8)]
            await asyncio.sleep(3)  # all 8 in the batcher
            started = time.monotonic()
            health = await client.get(f"{single}/health")
            return health, time.monotonic() - started, await asyncio.gather(*streams)

    health, took_s, results = run(scenario())
    assert health.status_code == 200, health.text
    assert took_s >= SIMULATED["health_probe_timeout_s"]  # the probe was held, and timed out
    assert all(r.complete and len(r.tokens) == 5 for r in results), results


def test_a_stalled_step_makes_its_batcher_unhealthy_and_it_is_replaced(stalling):
    """A forward that hangs (a stalled Neuron runtime) past `step_timeout_s`: /health turns 503, Serve's
    health check replaces the replica, and the request stuck in it, which had no token yet, is sent again
    to the new one and completes."""
    [before] = replicas(stalling)
    batcher("stalling").inject_fault.remote("prefill", 1, stall_s=600).result()

    async def scenario():
        async with httpx.AsyncClient(timeout=120) as client:
            stuck = asyncio.create_task(client.post(f"{stalling}/generate", json=body(5)))
            deadline = time.monotonic() + 15  # past step_timeout_s, until Serve's replacement is up
            while (health := await client.get(f"{stalling}/health")).status_code == 200 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            return health, await stuck

    health, stuck = run(scenario())
    assert health.status_code == 503, health.text
    assert stuck.status_code == 200 and stuck.json()["generated_text"], stuck.text
    [after] = replicas(stalling)
    assert after["replica"] != before["replica"] and after["healthy"]
    assert httpx.get(f"{stalling}/health", timeout=30).status_code == 200


def test_an_ingress_replica_lost_mid_stream_frees_its_rows_and_stalls_no_other_stream(cluster):
    """Two ingress replicas share a batcher of 8 rows; one is killed mid-stream. Its batcher learns it from
    the channel closing and frees those rows at once, while the other ingress's streams go on without a
    pause. (Over Ray's actor calls, where a Python `serve.run` of the app used to put the ingress's calls,
    each lost call held the batcher's event loop for 1 s: a 4 s pause for every other stream.)"""
    import ray

    url = cluster.deploy("ingress_lost", {**SIMULATED, "num_replicas": 1, "ingress_replicas": 2, "max_batch_size": 8})
    arrivals: dict[int, list[float]] = {}

    def active() -> int:
        return batcher("ingress_lost").status.remote().result(timeout_s=30)["active"]

    def streams_per_ingress() -> dict[str, int]:  # from Serve's own count, which its router asks for
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith("SERVE_REPLICA::ingress_lost#Ingress#")]
        return {name: ray.get(ray.get_actor(name, namespace="serve").get_num_ongoing_requests.remote()) for name in names}

    # HAProxy lists the second ingress replica a few seconds after the app is up; until then it gets nothing.
    wait_until(lambda: len(streams_per_ingress()) == 2, 30, what="two ingress replicas")
    time.sleep(5)

    async def scenario():
        async with httpx.AsyncClient(timeout=120) as client:
            tasks = [asyncio.create_task(stream(client, url, body(600),
                                                on_token=lambda r, i=i: arrivals.setdefault(i, []).append(time.monotonic())))
                     for i in range(8)]  # ~10 s each
            await asyncio.to_thread(wait_until, lambda: len(arrivals) == 8 and active() == 8, 30, what="8 streams")
            counts = streams_per_ingress()
            victim = max(counts, key=counts.get)
            assert 0 < counts[victim] < 8, counts  # HAProxy balances by connections: both have some
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            killed_at = time.monotonic()
            await asyncio.to_thread(wait_until, lambda: active() < 8, 5, what="the lost ingress's rows free")
            freed_s = time.monotonic() - killed_at
            return killed_at, freed_s, await asyncio.gather(*tasks, return_exceptions=True)

    try:
        killed_at, freed_s, results = run(scenario())
        survivors = [i for i, r in enumerate(results) if isinstance(r, StreamResult) and r.complete]
        assert 0 < len(survivors) < 8, results
        pauses = [b - a for i in survivors for a, b in zip(arrivals[i], arrivals[i][1:]) if b > killed_at]
        print(f"ingress lost: rows free {freed_s:.2f}s after the kill; the other streams' longest pause {max(pauses):.3f}s")
        assert max(pauses) < 1.0  # over Ray actor calls each lost call held the loop 1 s, and 4 s in all
        wait_until(lambda: httpx.post(f"{url}/generate", json=body(5), timeout=30).status_code == 200, 60,
                   what="the app serving")
    finally:
        cluster.delete("ingress_lost")


def test_fault_injection_is_off_unless_configured(pair):
    with pytest.raises(Exception, match="fault injection is off"):
        batcher("pair").inject_fault.remote("any", 1).result()
