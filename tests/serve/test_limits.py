"""Overload (429), body size (413) and the API key (401). A client that walks away: tests/reliability/test_load.py."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from .conftest import SIDE_ARGS

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def guarded(cluster):
    # 1024 tokens (the tiny model's positions), so that a long stream holds its permit for seconds
    url = cluster.deploy("guarded", {**SIDE_ARGS, "api_key": KEY, "max_concurrent_requests": 2, "payload_limit": 4096,
                                     "max_total_tokens": 1024, "compute_type": "inf2.xlarge"})
    yield url
    cluster.delete("guarded")


AUTH = {"authorization": f"Bearer {KEY}"}


def test_api_key_guards_the_routes_tgi_guards(guarded):
    """TGI guards generation, /tokenize and /invocations, and leaves health, info, metrics, the model
    list, /chat_tokenize and the docs open (so a Prometheus scrape needs no key)."""
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}
    assert httpx.post(f"{guarded}/generate", json=body, timeout=30).status_code == 401
    wrong = httpx.post(f"{guarded}/generate", json=body, headers={"authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401 and wrong.json()["error_type"] == "unauthorized"
    served = httpx.post(f"{guarded}/generate", json=body, headers=AUTH, timeout=30)
    assert served.status_code == 200 and served.headers["x-compute-type"] == "inf2.xlarge"  # COMPUTE_TYPE, as TGI's
    # TGI compares the whole header in lower case: the scheme's case does not matter, nor the key's
    for header in (f"bearer {KEY}", f"BEARER {KEY.upper()}"):
        assert httpx.post(f"{guarded}/generate", json=body, headers={"authorization": header}, timeout=30).status_code == 200
    assert httpx.post(f"{guarded}/generate", json=body, headers={"authorization": f"Bearer {KEY}x"}, timeout=30).status_code == 401
    for path in ("/", "/generate_stream", "/tokenize", "/invocations", "/v1/completions", "/v1/chat/completions"):
        assert httpx.post(f"{guarded}{path}", json=body, timeout=30).status_code == 401, path
    for path in ("/", "/health", "/ping", "/info", "/metrics", "/v1/models", "/docs", "/api-doc/openapi.json"):
        assert httpx.get(f"{guarded}{path}", timeout=30).status_code == 200, path
    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    assert httpx.post(f"{guarded}/chat_tokenize", json=chat, timeout=30).status_code == 200


def test_body_over_the_payload_limit_is_413(guarded):
    big = {"inputs": "x" * 5000, "parameters": {}}
    r = httpx.post(f"{guarded}/generate", json=big, headers=AUTH, timeout=30)
    assert r.status_code == 413
    assert r.json() == {"error": "Failed to buffer the request body: length limit exceeded", "error_type": "payload_too_large"}


def test_requests_beyond_max_concurrent_get_429_and_the_rest_complete(guarded):
    async def burst():
        async with httpx.AsyncClient(timeout=120, headers=AUTH) as client:
            body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 1000}}  # the 2 admitted last seconds
            return await asyncio.gather(*(client.post(f"{guarded}/generate", json=body) for _ in range(6)))

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 200, 429, 429, 429, 429]
    rejected = next(r for r in responses if r.status_code == 429)
    assert rejected.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
    assert all(r.json()["generated_text"] for r in responses if r.status_code == 200)


def test_best_of_takes_a_permit_per_sequence(guarded):
    """As in TGI, whose `best_of` runs each sequence as a request of its own: of 2 permits, a stream holds
    one, and a `best_of: 2` request is refused; alone, it is served."""
    best_of = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 8, "best_of": 2, "do_sample": True,
                                                            "details": True}}
    long = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 1000}}  # ~2 s here

    def refused_while_a_stream_runs() -> httpx.Response | None:
        """The best_of request's answer while the stream held its permit; None if the stream did not last
        (once in a full run its connection was cut 9 ms in, and the ingress cancelled it; cause not found)."""
        with httpx.Client(timeout=60, headers=AUTH) as client:
            with client.stream("POST", f"{guarded}/generate_stream", json=long) as response:
                lines = response.iter_lines()
                assert '"token"' in next(line for line in lines if line.startswith("data:"))
                refused = client.post(f"{guarded}/generate", json=best_of)
                try:
                    events = [line for line in lines if line.startswith("data:")]
                except httpx.HTTPError:
                    return None
        return refused if events and '"generated_text":"' in events[-1] else None

    refused = next(filter(None, (refused_while_a_stream_runs() for _ in range(3))))
    with httpx.Client(timeout=60, headers=AUTH) as client:
        served = client.post(f"{guarded}/generate", json=best_of)
    assert refused.status_code == 429 and refused.json()["error_type"] == "overloaded", refused.text
    assert served.status_code == 200 and len(served.json()["details"]["best_of_sequences"]) == 1, served.text
