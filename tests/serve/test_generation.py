"""Greedy tokens over HTTP, through Ray Serve, equal transformers' `generate` on every route family,
while other requests run on the same replicas."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from .conftest import SIDE_ARGS

PROMPT = "What is Deep Learning?"
N = 12


@pytest.fixture(scope="module")
def expected(tokenizer, reference):
    """Greedy continuation of PROMPT, as ids and as text."""
    ids = reference(tokenizer(PROMPT).input_ids, N)
    return ids, tokenizer.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def expected_chat(tokenizer, reference):
    messages = [{"role": "user", "content": PROMPT}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = reference(prompt_ids, N)
    return ids, tokenizer.decode(ids, skip_special_tokens=True), len(prompt_ids)


def sse_events(text: str) -> list:
    events = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            payload = block[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


async def background_load(url: str, stop: asyncio.Event) -> int:
    """Sampled requests on the same replicas, for as long as the test runs."""
    done = 0
    async with httpx.AsyncClient(timeout=120) as client:
        while not stop.is_set():
            body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 24, "do_sample": True, "temperature": 1.3}}
            assert (await client.post(f"{url}/generate", json=body)).status_code == 200
            done += 1
    return done


async def with_load(url: str, coro):
    stop = asyncio.Event()
    loads = [asyncio.create_task(background_load(url, stop)) for _ in range(3)]
    await asyncio.sleep(0.3)
    try:
        return await coro
    finally:
        stop.set()
        assert sum(await asyncio.gather(*loads)) > 0


def test_every_route_gives_transformers_greedy_tokens_under_load(app, expected, expected_chat):
    ids, text = expected
    chat_ids, chat_text, chat_prompt_len = expected_chat

    async def run_all():
        async with httpx.AsyncClient(timeout=120) as c:
            params = {"max_new_tokens": N, "details": True}
            generate, stream, compat, completions, chat, chat_stream = await asyncio.gather(
                c.post(f"{app}/generate", json={"inputs": PROMPT, "parameters": params}),
                c.post(f"{app}/generate_stream", json={"inputs": PROMPT, "parameters": params}),
                c.post(f"{app}/", json={"inputs": PROMPT, "parameters": {**params, "return_full_text": False}}),
                c.post(f"{app}/v1/completions", json={"prompt": PROMPT, "max_tokens": N, "temperature": 0}),
                c.post(f"{app}/v1/chat/completions", json={"messages": [{"role": "user", "content": PROMPT}],
                                                           "max_tokens": N, "temperature": 0}),
                c.post(f"{app}/v1/chat/completions", json={"messages": [{"role": "user", "content": PROMPT}],
                                                           "max_tokens": N, "temperature": 0, "stream": True,
                                                           "stream_options": {"include_usage": True}}),
            )
        return generate, stream, compat, completions, chat, chat_stream

    generate, stream, compat, completions, chat, chat_stream = asyncio.run(with_load(app, run_all()))

    body = generate.json()
    assert [t["id"] for t in body["details"]["tokens"]] == ids and body["generated_text"] == text
    assert generate.headers["x-generated-tokens"] == str(N) and int(generate.headers["x-prompt-tokens"]) == 6

    events = sse_events(stream.text)
    assert stream.headers["content-type"] == "text/event-stream"  # as TGI's, with no charset
    assert [e["token"]["id"] for e in events] == ids and "[DONE]" not in events
    assert [e["index"] for e in events] == list(range(1, N + 1))
    # As in TGI, a special token's event has its own text, which `generated_text` leaves out.
    assert events[-1]["generated_text"] == text
    assert "".join(e["token"]["text"] for e in events if not e["token"]["special"]) == text
    assert events[-1]["details"]["input_length"] == 6 and all(e["details"] is None for e in events[:-1])

    compat_body = compat.json()
    assert isinstance(compat_body, list) and [t["id"] for t in compat_body[0]["details"]["tokens"]] == ids

    assert completions.json()["choices"][0]["text"] == text
    assert completions.json()["usage"] == {"prompt_tokens": 6, "completion_tokens": N, "total_tokens": 6 + N}

    message = chat.json()["choices"][0]
    assert message["message"] == {"role": "assistant", "content": chat_text}
    assert chat.json()["usage"]["prompt_tokens"] == chat_prompt_len

    chunks = sse_events(chat_stream.text)
    assert chunks[-1] == "[DONE]"
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks[:-2]) == chat_text
    assert chunks[-2]["choices"] == [] and chunks[-2]["usage"]["completion_tokens"] == N


def test_compat_route_returns_full_text_by_default_and_streams(app, expected):
    _, text = expected
    full = httpx.post(f"{app}/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": N}}, timeout=60).json()
    assert full[0]["generated_text"] == PROMPT + text  # TGI: text-generation models return the prompt too
    streamed = sse_events(httpx.post(f"{app}/", json={"inputs": PROMPT, "stream": True,
                                                      "parameters": {"max_new_tokens": N}}, timeout=60).text)
    assert streamed[-1]["generated_text"] == PROMPT + text


def test_details_top_tokens_prefill_and_seeded_sampling(app, tokenizer, hf_model, expected):
    ids, _ = expected
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": N, "decoder_input_details": True, "top_n_tokens": 3}}
    details = httpx.post(f"{app}/generate", json=body, timeout=60).json()["details"]
    prompt_ids = tokenizer(PROMPT).input_ids
    assert [t["id"] for t in details["prefill"]] == prompt_ids and details["prefill"][0]["logprob"] is None
    assert all(isinstance(t["logprob"], float) for t in details["prefill"][1:])
    assert [top[0]["id"] for top in details["top_tokens"]] == ids and all(len(top) == 3 for top in details["top_tokens"])

    sampled = {"inputs": PROMPT, "parameters": {"max_new_tokens": N, "do_sample": True, "seed": 7, "details": True}}
    first = httpx.post(f"{app}/generate", json=sampled, timeout=60).json()
    second = httpx.post(f"{app}/generate", json=sampled, timeout=60).json()
    assert first == second and first["details"]["seed"] == 7
    other = httpx.post(f"{app}/generate", json={**sampled, "parameters": {**sampled["parameters"], "seed": 8}}, timeout=60)
    assert [t["id"] for t in other.json()["details"]["tokens"]] != [t["id"] for t in first["details"]["tokens"]]

    # TGI's parameters are float32: 1e-39 is a valid temperature, which overflows float32 scores. Its limit
    # is greedy, and the request gets it (the sampler reruns such a row in float64).
    cold = {"inputs": PROMPT, "parameters": {"max_new_tokens": N, "do_sample": True, "temperature": 1e-39,
                                             "details": True}}
    response = httpx.post(f"{app}/generate", json=cold, timeout=60)
    assert response.status_code == 200 and [t["id"] for t in response.json()["details"]["tokens"]] == ids
    # `watermark` is accepted and ignored, as in neuronx-tgi: the greedy tokens.
    marked = {"inputs": PROMPT, "parameters": {"max_new_tokens": N, "watermark": True, "details": True}}
    response = httpx.post(f"{app}/generate", json=marked, timeout=60)
    assert response.status_code == 200 and [t["id"] for t in response.json()["details"]["tokens"]] == ids

    # More top tokens than top_k leaves: only the two it leaves, in the answer and in the stream.
    narrow = {"inputs": PROMPT, "parameters": {"max_new_tokens": 4, "top_k": 2, "top_n_tokens": 4, "details": True}}
    response = httpx.post(f"{app}/generate", json=narrow, timeout=60)
    assert response.status_code == 200 and all(len(top) == 2 for top in response.json()["details"]["top_tokens"])
    events = sse_events(httpx.post(f"{app}/generate_stream", json=narrow, timeout=60).text)
    assert len(events) == 4 and all(len(e["top_tokens"]) == 2 for e in events)

    # best_of: the sequence with the highest mean logprob per token, as TGI picks it; the others beside it.
    best_of = {"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "best_of": 2, "do_sample": True,
                                                "temperature": 1.5, "details": True}}
    result = httpx.post(f"{app}/generate", json=best_of, timeout=60).json()
    mean = lambda tokens: sum(t["logprob"] for t in tokens) / len(tokens)  # noqa: E731
    others = [mean(s["tokens"]) for s in result["details"]["best_of_sequences"]]
    assert len(others) == 1 and others[0] != mean(result["details"]["tokens"])  # sampled apart
    assert mean(result["details"]["tokens"]) >= max(others)


def test_stop_sequence_through_http(app, expected, tokenizer):
    _, text = expected
    stop = text.split()[2]
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": N, "stop": [stop], "details": True}}
    result = httpx.post(f"{app}/generate", json=body, timeout=60).json()
    assert result["details"]["finish_reason"] == "stop_sequence" and stop in result["generated_text"]
    assert text.startswith(result["generated_text"])
    # A stop sequence may name a special token (TGI's stop sequences see their text): the greedy
    # continuation has one, and the request ends there. As in TGI, the token has its own text in
    # `details.tokens` and none in `generated_text`.
    ids, _ = expected
    k = next(i for i, t in enumerate(ids) if t in tokenizer.all_special_ids)
    body["parameters"]["stop"] = [tokenizer.convert_ids_to_tokens(ids[k])]
    result = httpx.post(f"{app}/generate", json=body, timeout=60).json()
    assert result["details"]["finish_reason"] == "stop_sequence" and result["details"]["generated_tokens"] == k + 1
    special = body["parameters"]["stop"][0]
    assert result["details"]["tokens"][-1] == {**result["details"]["tokens"][-1], "special": True, "text": special}
    assert special not in result["generated_text"]


def test_a_stream_interval_still_gives_one_event_per_token_in_order(cluster, expected):
    """`stream_interval: 5`: the batcher hands tokens to the ingress five at a time after the first
    (how they are grouped is tested on the engine); the client still sees TGI's stream, token by token."""
    url = cluster.deploy("grouped", {**SIDE_ARGS, "stream_interval": 5})
    try:
        ids, text = expected
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": N, "details": True}}
        events = sse_events(httpx.post(f"{url}/generate_stream", json=body, timeout=60).text)
        assert [e["token"]["id"] for e in events] == ids
        assert events[-1]["generated_text"] == text and events[-1]["details"]["generated_tokens"] == N
        assert all(e["generated_text"] is None for e in events[:-1])
        assert [r["stream_interval"] for r in httpx.get(f"{url}/info", timeout=30).json()["replicas"]] == [5]
    finally:
        cluster.delete("grouped")
