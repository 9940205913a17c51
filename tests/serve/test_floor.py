"""The no-op app `make bench` times right after ours: through HTTP and Serve's call to its second deployment,
read by the load generator as one TGI event."""

from __future__ import annotations

import asyncio
import time

import httpx

from ..conftest import load_script, wait_healthy


def test_the_no_op_app_answers_one_tgi_event_through_its_second_deployment(cluster):
    from ray import serve

    from deployments.floor import app

    serve.run(app, name="floor", route_prefix="/floor")
    try:
        url = f"{cluster.http}/floor"
        wait_healthy(url, 60)
        response = httpx.post(f"{url}/generate_stream", json={"inputs": "Hello there"}, timeout=30)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        assert response.text.startswith("data:") and '"id": 11' in response.text  # len("Hello there"), counted there

        bench = load_script("bench")
        jobs = [bench.Job(f"prompt {i}", (0,), 4, 0.0) for i in range(3)]

        async def run():
            async with bench.http_target(bench.TGIStream, "no-op app", url) as target:
                return await bench.run_load(target, jobs, concurrency=1, quiet=True)

        summary = asyncio.run(run()).summary()
        assert (summary["requests"], summary["errors"], summary["tokens"]) == (3, 0, 3)
    finally:
        serve.delete("floor")


def test_the_waiting_no_op_app_answers_after_its_wait(cluster):
    from ray import serve

    from deployments.floor import build_app

    serve.run(build_app({"wait_ms": 300}), name="floor-waiting", route_prefix="/floor-waiting")
    try:
        url = f"{cluster.http}/floor-waiting"
        wait_healthy(url, 60)
        started = time.monotonic()
        response = httpx.post(f"{url}/generate_stream", json={"inputs": "Hello"}, timeout=30)
        assert response.status_code == 200 and '"id": 5' in response.text
        assert time.monotonic() - started >= 0.3
    finally:
        serve.delete("floor-waiting")
