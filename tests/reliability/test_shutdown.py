"""Redeploy and shutdown drain: in-flight streams finish, newcomers are served or get a clean error."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from .conftest import SIMULATED, body, newcomer, run, streaming, wait_until

pytestmark = pytest.mark.slow

ARGS = {**SIMULATED, "num_replicas": 2, "graceful_shutdown_timeout_s": 60, "max_concurrent_requests": 64}


@pytest.fixture(scope="module")
def rolling(cluster):
    url = cluster.deploy("rolling", ARGS)
    yield url
    cluster.delete("rolling")


def redeploy(args: dict) -> threading.Thread:
    """`serve deploy` of a changed config, as the Serve API does it; returns the thread that waits for it."""
    from ray import serve

    from deployments.app import build_app

    thread = threading.Thread(target=serve.run, args=(build_app(args),),
                              kwargs={"name": "rolling", "route_prefix": "/rolling"}, daemon=True)
    thread.start()
    return thread


def test_a_redeploy_drains_in_flight_streams_and_serves_newcomers(rolling):
    before = {r["replica"] for r in httpx.get(f"{rolling}/info", timeout=30).json()["replicas"]}

    async def scenario():
        async with httpx.AsyncClient(timeout=180) as client:
            in_flight = await streaming(client, rolling, 6, 400)
            update = redeploy({**ARGS, "max_stop_sequences": 5})  # a changed config: every replica is replaced
            newcomers = []
            while update.is_alive():  # requests keep arriving during the rolling update
                newcomers.append(asyncio.create_task(newcomer(client, rolling)))
                await asyncio.sleep(0.3)
            return await asyncio.gather(*in_flight), await asyncio.gather(*newcomers)

    drained, newcomers = run(scenario())
    assert all(r.complete and len(r.tokens) == 400 for r in drained), drained  # none was cut
    assert newcomers
    for r in newcomers:  # served, or refused cleanly (no replica yet, or too many waiting); never cut
        assert r.complete or (r.failed_cleanly and r.errors[0]["error_type"] in ("overloaded", "unhealthy")), r
    assert any(r.complete for r in newcomers)
    after = wait_until(lambda: {r["replica"] for r in httpx.get(f"{rolling}/info", timeout=30).json()["replicas"]},
                       30, what="replicas listed")
    assert not before & after, (before, after)  # all replaced
    assert httpx.get(f"{rolling}/info", timeout=30).json()["max_stop_sequences"] == 5


def test_drain_finishes_in_flight_streams_before_the_app_goes(cluster):
    """`python -m deployments.drain`, the container's SIGTERM handler, up to where it shuts Serve down.

    Newcomers knock every 0.1 s through the first 3 s of the drain, the window in which HAProxy still
    lists the stopping ingress replica: each is served, or refused (404, or 503 within about a second);
    none is held (an ingress that admitted one after its app's batchers left held it until killed)."""
    from deployments.drain import drain

    url = cluster.deploy("draining", {**ARGS, "num_replicas": 1})

    async def knock(client: httpx.AsyncClient) -> int:
        response = await client.post(f"{url}/generate", json=body(5), timeout=15)
        if response.status_code == 503:  # refused by the ingress: TGI's error shape
            assert response.json()["error_type"] == "unhealthy", response.text
        return response.status_code

    async def scenario():
        async with httpx.AsyncClient(timeout=180) as client:
            in_flight = await streaming(client, url, 4, 300)  # every row of the batcher's 4
            queued = asyncio.create_task(client.post(f"{url}/generate", json=body(5), timeout=120))
            await asyncio.sleep(1.5)  # in the batcher's queue, with no token: it has told the ingress it holds it
            began = time.monotonic()
            def drained_at() -> float:
                drain(["draining"], shutdown=False)
                return time.monotonic()

            deleting = asyncio.create_task(asyncio.to_thread(drained_at))
            newcomers = []
            while time.monotonic() - began < 3:
                newcomers.append(asyncio.create_task(knock(client)))
                await asyncio.sleep(0.1)
            results = await asyncio.gather(*in_flight)
            finished = time.monotonic()
            statuses = await asyncio.gather(*newcomers)
            while statuses[-1] == 200 and time.monotonic() - began < 15:  # the drain had not begun to refuse yet
                statuses.append(await knock(client))
            return results, statuses, finished - began, await deleting - began, await queued

    results, statuses, streams_s, delete_s, queued = run(scenario())
    cluster.apps.remove("draining")
    assert all(r.complete and len(r.tokens) == 300 for r in results), results
    assert queued.status_code == 200, queued.text  # held by the batcher, not yet begun: finished all the same
    assert set(statuses) <= {200, 404, 503}, statuses  # served before the drain, else no longer routed
    assert statuses[-1] in (404, 503), statuses
    assert delete_s >= streams_s  # the drain returned only once they had finished
