"""Security: the API key guards every route but the open ones, compared in constant time; bounded
requests; no prompt text in any log. (That the KubeRay manifest exposes nothing publicly is checked
in tests/scripts/test_kuberay.py.)"""

from __future__ import annotations

import hmac

import httpx
import pytest

from ..conftest import ray_logs
from .conftest import SIMULATED

KEY = "a-long-enough-api-key-0123456789"
SECRET_PROMPT = "my bank password is hunter2-and-then-some"
UI = "https://ui.example"


@pytest.fixture(scope="module")
def secured(cluster):
    url = cluster.deploy("secured", {**SIMULATED, "num_replicas": 1, "api_key": KEY,
                                     "api_key_open_paths": ["/health", "/metrics"], "payload_limit": 10_000,
                                     "cors_allow_origin": [UI]})
    yield url
    cluster.delete("secured")


def test_every_route_but_the_open_ones_needs_the_key(secured):
    auth = {"authorization": f"Bearer {KEY}"}
    spec = httpx.get(f"{secured}/api-doc/openapi.json", headers=auth, timeout=30).json()
    routes = [(method.upper(), path) for path, ops in spec["paths"].items() for method in ops]
    routes += [("GET", "/docs"), ("GET", "/api-doc/openapi.json"), ("GET", "/")]  # outside the spec
    assert len(routes) >= 15
    for method, path in routes:
        for headers in ({}, {"authorization": "Bearer " + "x" * len(KEY)}, {"authorization": KEY}):
            r = httpx.request(method, f"{secured}{path}", headers=headers, json={}, timeout=30)
            if path in ("/health", "/metrics"):
                assert r.status_code != 401, (method, path)
            else:
                assert r.status_code == 401, (method, path, headers)
                assert r.json()["error_type"] == "unauthorized"
        with_key = httpx.request(method, f"{secured}{path}", headers=auth, json={}, timeout=30)
        assert with_key.status_code != 401, (method, path)
    assert httpx.get(f"{secured}/ping", timeout=30).status_code == 401  # not open in this configuration


def test_only_the_allowed_origin_may_call_from_a_browser(secured):
    """CORS_ALLOW_ORIGIN, as TGI: a browser's preflight (which carries no key) passes for the listed origin
    alone, for GET and POST with the key's header; its answers then carry the origin."""
    def preflight(origin: str) -> httpx.Response:
        return httpx.options(f"{secured}/generate", timeout=30, headers={
            "origin": origin, "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type"})

    allowed = preflight(UI)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == UI
    assert {"GET", "POST"} <= {m.strip() for m in allowed.headers["access-control-allow-methods"].split(",")}
    other = preflight("https://elsewhere.example")
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    r = httpx.post(f"{secured}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}, timeout=60,
                   headers={"origin": UI, "authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == UI


def test_the_key_is_compared_in_constant_time(monkeypatch):
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from deployments import http_api

    compared = []
    constant_time = hmac.compare_digest

    def recording_compare(a, b):
        compared.append((a, b))
        return constant_time(a, b)

    monkeypatch.setattr(http_api.hmac, "compare_digest", recording_compare)
    app = http_api.ApiKey(Starlette(), key=KEY, open_paths=set())
    assert TestClient(app).get("/generate", headers={"authorization": "Bearer nope"}).status_code == 401
    assert compared == [(b"bearer nope", f"bearer {KEY}".encode())]  # both in lower case, as TGI compares them


def test_requests_are_bounded(secured):
    auth = {"authorization": f"Bearer {KEY}"}
    huge = httpx.post(f"{secured}/generate", headers=auth, timeout=30,
                      json={"inputs": "x" * 20_000, "parameters": {"max_new_tokens": 2}})
    assert huge.status_code == 413
    greedy = httpx.post(f"{secured}/generate", headers=auth, timeout=30,
                        json={"inputs": "Hi", "parameters": {"max_new_tokens": 10**6}})
    assert greedy.status_code == 422 and "max_new_tokens" in greedy.json()["error"]


def test_no_prompt_text_in_any_log(cluster, secured):
    auth = {"authorization": f"Bearer {KEY}"}
    sent = [
        ("/generate", {"inputs": SECRET_PROMPT, "parameters": {"max_new_tokens": 3}}),
        ("/generate_stream", {"inputs": SECRET_PROMPT, "parameters": {"max_new_tokens": 3}}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": SECRET_PROMPT}], "max_tokens": 3}),
        ("/v1/completions", {"prompt": SECRET_PROMPT, "max_tokens": 3}),
        ("/tokenize", {"inputs": SECRET_PROMPT}),
        ("/generate", {"inputs": SECRET_PROMPT * 50, "parameters": {"max_new_tokens": 3}}),  # too long: 422
        ("/generate", {"inputs": SECRET_PROMPT, "parameters": {"temperature": -1}}),  # invalid: 422
    ]
    for path, payload in sent:
        assert httpx.post(f"{secured}{path}", json=payload, headers=auth, timeout=60).status_code < 500
    leaked = [f.name for f in ray_logs().rglob("*") if f.is_file() and SECRET_PROMPT.encode() in f.read_bytes()]
    assert not leaked, leaked
