"""Bad input, property-based: well over 1000 malformed or extreme requests on the real app.

Routes and field names come from the app's own OpenAPI spec (`/api-doc/openapi.json`); values are
wrong types, huge and negative numbers, NaN and infinities, empty and unicode-edge strings (lone
surrogates, NULs, RTL marks), huge stop lists, invalid grammars; bodies are also invalid JSON or come
with the wrong content type. Every answer must be below 500, in TGI's error shape when it is an
error, and a 200 stream must be well-formed SSE. Hypothesis runs derandomized, so CI is repeatable.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import SIMULATED

pytestmark = pytest.mark.slow

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
STREAM_ROUTES = {"/generate_stream"}
SENT: dict[str, int] = {"count": 0}  # requests sent, and answers by status


@pytest.fixture(scope="module")
def fuzz_app(cluster):
    # A fast simulated model (~1 ms a step) and short sequences, so that valid requests finish quickly.
    url = cluster.deploy("fuzz", {**SIMULATED, "simulated_params": 1e8, "num_replicas": 1, "max_total_tokens": 256,
                                  "max_input_tokens": 128, "max_concurrent_requests": 64})
    with httpx.Client(base_url=url, timeout=60) as client:
        yield client, _post_routes(client.get("/api-doc/openapi.json").json())
    cluster.delete("fuzz")
    print(f"fuzz: {SENT}")
    assert SENT["count"] >= 1000, SENT


def _resolve(spec: dict, schema: dict) -> dict:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:  # the first object-shaped alternative
            options = [_resolve(spec, s) for s in schema[key]]
            return next((o for o in options if "properties" in o), options[0])
    return schema


def _post_routes(spec: dict) -> dict[str, dict[str, list[str]]]:
    """{route: {"": top-level fields, field: its own fields when it is an object}} for every POST route."""
    routes = {}
    for path, ops in spec["paths"].items():
        content = ops.get("post", {}).get("requestBody", {}).get("content", {}).get("application/json")
        if not content:
            continue
        schema = _resolve(spec, content["schema"])
        fields = {"": sorted(schema.get("properties", {}))}
        for name, sub in schema.get("properties", {}).items():
            sub = _resolve(spec, sub)
            if "properties" in sub:
                fields[name] = sorted(sub["properties"])
        routes[path] = fields
    assert {"/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions", "/tokenize"} <= set(routes)
    return routes


VALID = {
    "/generate": {"inputs": "Hello", "parameters": {"max_new_tokens": 3}},
    "/generate_stream": {"inputs": "Hello", "parameters": {"max_new_tokens": 3}},
    "/": {"inputs": "Hello", "parameters": {"max_new_tokens": 3}, "stream": False},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3},
    "/v1/completions": {"prompt": "Hello", "max_tokens": 3},
    "/invocations": {"inputs": "Hello", "parameters": {"max_new_tokens": 3}},
}

edge_text = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(codec=None, categories=None), max_size=20),  # lone surrogates included
    st.sampled_from(["", " ", "\x00", "\ud800", "\udfff", "\u202e\u202d", "🙂" * 50, "a" * 3000, "\r\n" * 30]),
)
edge_number = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 2**64, 1e308, -0.0, 1e-320]),
)
edge_value = st.recursive(
    st.one_of(st.none(), st.booleans(), edge_number, edge_text),
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(edge_text, inner, max_size=4)),
    max_leaves=12,
)
huge_stop = st.integers(1, 2000).map(lambda n: ["stop"] * n)
bad_grammar = st.sampled_from([
    {"type": "json", "value": {"type": "object"}}, {"type": "regex", "value": "[a-z"}, {"type": "bogus"},
    {"type": "json", "value": "not a schema"}, "json",
])


def _dumps(value) -> bytes:
    return json.dumps(value, allow_nan=True, ensure_ascii=True).encode()  # NaN/Infinity as Python writes them


@st.composite
def mutated_bodies(draw, routes):
    path = draw(st.sampled_from(sorted(p for p in routes if p in VALID)))
    body = json.loads(json.dumps(VALID[path]))
    fields = routes[path]
    for _ in range(draw(st.integers(1, 3))):
        parent = draw(st.sampled_from(sorted(fields)))
        name = draw(st.sampled_from(fields[parent] or ["unknown"]))
        value = draw(st.one_of(edge_value, huge_stop, bad_grammar) if name in ("stop", "grammar", "response_format")
                     else edge_value)
        target = body if parent == "" else body.setdefault(parent, {})
        if isinstance(target, dict):
            target[name] = value
    return path, _dumps(body), "application/json"


@st.composite
def raw_bodies(draw, routes):
    path = draw(st.sampled_from(sorted(routes)))
    payload = draw(st.one_of(
        st.binary(max_size=200),
        st.sampled_from([b"", b"{", b"null", b"[]", b"{\"inputs\": NaN}", b"\xff\xfe", b'{"inputs": "\\ud800"}',
                         b'{"inputs": "x", "parameters": {"max_new_tokens": 1e999}}', b"[" * 5000]),
        edge_value.map(_dumps),
    ))
    content_type = draw(st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                         "multipart/form-data; boundary=x", "", "application/json; charset=latin-1"]))
    return path, payload, content_type


def check(client: httpx.Client, path: str, payload: bytes, content_type: str) -> None:
    headers = {"content-type": content_type} if content_type else {}
    SENT["count"] += 1
    response = client.post(path, content=payload, headers=headers)
    SENT[str(response.status_code)] = SENT.get(str(response.status_code), 0) + 1
    assert response.status_code < 500, (path, payload[:300], response.status_code, response.text[:300])
    if response.status_code >= 400:
        error = response.json()
        assert isinstance(error.get("error"), str) and isinstance(error.get("error_type"), str), error
        return
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        lines = [line.strip() for line in response.text.splitlines() if line.startswith("data:")]
        events = [json.loads(line[5:]) for line in lines if line != "data: [DONE]"]
        for event in events:  # TGI's error event, or OpenAI's
            error = event.get("error")
            assert error is None or (isinstance(error, str) and isinstance(event.get("error_type"), str)) or (
                isinstance(error, dict) and isinstance(error.get("message"), str)), event
        # Every stream ends: OpenAI's with [DONE], TGI's with its last token's text or an error.
        assert lines and (lines[-1] == "data: [DONE]" or events[-1].get("generated_text") is not None
                          or "error" in events[-1]), response.text[-300:]
    else:
        response.json()


@settings(FUZZ, max_examples=800)
@given(data=st.data())
def test_mutated_bodies_on_every_route(fuzz_app, data):
    client, routes = fuzz_app
    check(client, *data.draw(mutated_bodies(routes)))


@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_raw_bodies_and_content_types(fuzz_app, data):
    client, routes = fuzz_app
    check(client, *data.draw(raw_bodies(routes)))


def test_the_app_still_generates_after_the_fuzz(fuzz_app):
    client, _ = fuzz_app
    r = client.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 5}})
    assert r.status_code == 200 and r.json()["generated_text"]
