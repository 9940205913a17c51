"""Every validation rule of TGI's router: its status, error_type and message, over HTTP through Ray Serve.

The main app runs with max_input_tokens 128 and max_total_tokens 256; TGI's defaults elsewhere
(max_best_of 2, max_stop_sequences 4, max_top_n_tokens 5, max_client_batch_size 4).
"""

from __future__ import annotations

import json

import httpx
import pytest

P = "What is Deep Learning?"  # 6 tokens with BOS


RULES = [
    ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
    ({"best_of": 3, "do_sample": True}, "`best_of` must be > 0 and <= 2. Given: 3"),
    ({"temperature": 0.0}, "`temperature` must be strictly positive"),
    ({"temperature": -1}, "`temperature` must be strictly positive"),
    ({"temperature": 1e-46}, "`temperature` must be strictly positive"),  # TGI's f32: 0.0
    ({"repetition_penalty": 0.0}, "`repetition_penalty` must be strictly positive"),
    ({"frequency_penalty": 2.5}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"frequency_penalty": -2.01}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"top_p": 0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"top_p": 0.99999999}, "`top_p` must be > 0.0 and < 1.0"),  # TGI's f32: 1.0
    ({"typical_p": 1.0}, "`typical_p` must be > 0.0 and < 1.0"),
    ({"typical_p": -0.5}, "`typical_p` must be > 0.0 and < 1.0"),
    ({"top_k": 0}, "`top_k` must be strictly positive"),
    ({"top_k": -3}, "`top_k` must be strictly positive"),
    ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
    ({"best_of": 2, "do_sample": True, "seed": 1}, "`seed` must not be set when `best_of` > 1"),
    ({"top_n_tokens": 6}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
    ({"truncate": 0}, "`truncate` must be strictly positive and less than 128. Given: 0"),
    ({"truncate": 129}, "`truncate` must be strictly positive and less than 128. Given: 129"),
    ({"max_new_tokens": 251}, "`inputs` tokens + `max_new_tokens` must be <= 256. Given: 6 `inputs` tokens and 251 `max_new_tokens`"),
    ({"grammar": {"type": "json", "value": {"properties": {}}}}, "grammar is not supported"),
]


@pytest.mark.parametrize("params, message", RULES, ids=[m[:40] for _, m in RULES])
def test_generate_rule(app, params, message):
    response = httpx.post(f"{app}/generate", json={"inputs": P, "parameters": params}, timeout=60)
    assert response.status_code == 422
    assert response.json() == {"error": f"Input validation error: {message}", "error_type": "validation"}


def test_inputs_rules(app, tokenizer):
    empty = httpx.post(f"{app}/generate", json={"inputs": "", "parameters": {}}, timeout=60)
    assert (empty.status_code, empty.json()["error"]) == (422, "Input validation error: `inputs` cannot be empty")
    too_long = "word " * 70
    n = len(tokenizer(too_long).input_ids)
    assert 128 < n < 246
    r = httpx.post(f"{app}/generate", json={"inputs": too_long, "parameters": {"max_new_tokens": 10}}, timeout=60)
    assert r.status_code == 422
    assert r.json()["error"] == f"Input validation error: `inputs` must have less than 128 tokens. Given: {n}"
    # Truncation keeps the last tokens and lets the same prompt through; with max_new_tokens absent, the
    # request may run to max_total_tokens (256 - 100 here: this prompt meets no EOS before).
    ok = httpx.post(f"{app}/generate", timeout=60, json={"inputs": too_long, "parameters": {
        "truncate": 100, "details": True, "decoder_input_details": True}})
    assert ok.status_code == 200 and ok.headers["x-prompt-tokens"] == "100"
    details = ok.json()["details"]
    assert [t["id"] for t in details["prefill"]] == tokenizer(too_long).input_ids[-100:]
    assert (details["finish_reason"], details["generated_tokens"]) == ("length", 256 - 100)


def test_stream_errors_arrive_as_one_event_on_http_200(app):
    cases = [
        ({"best_of": 2, "do_sample": True}, "`best_of` != 1 is not supported when streaming tokens"),
        ({"decoder_input_details": True}, "`decoder_input_details` == true is not supported when streaming tokens"),
        ({"temperature": 0}, "`temperature` must be strictly positive"),
    ]
    for params, message in cases:
        r = httpx.post(f"{app}/generate_stream", json={"inputs": P, "parameters": params}, timeout=60)
        assert r.status_code == 200
        assert r.text == "data: " + json.dumps({"error": f"Input validation error: {message}", "error_type": "validation"},
                                              separators=(",", ":")) + "\n\n"


def test_openai_stream_errors_are_openai_events_then_done(app):
    r = httpx.post(f"{app}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "stream": True, "top_p": 1.0})
    assert r.status_code == 200
    assert r.text.split("\n\n")[:2] == [
        'data: {"error":{"message":"Input validation error: `top_p` must be > 0.0 and < 1.0","http_status_code":422}}',
        "data: [DONE]",
    ]
    plain = httpx.post(f"{app}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "top_p": 1.0}, timeout=60)
    assert plain.status_code == 422 and plain.json()["error_type"] == "validation"


@pytest.mark.parametrize("stream", [False, True])
def test_completions_handler_rules(app, stream):
    """TGI's handler refuses these before any stream starts: a plain 422 either way."""
    refusals = [
        ({"prompt": P, "suffix": "x"}, {"error": "Suffix is not supported and can be achieved by preprocessing the prompt.",
                                        "error_type": "suffix not supported"}),
        ({"prompt": [P] * 5}, {"error": "Number of prompts exceeds the maximum allowed batch size of 4",
                               "error_type": "batch size exceeded"}),
        # TGI's refuses it while reading the body, before its handler counts a request
        ({"prompt": []}, {"error": "Failed to deserialize the JSON body into the target type: prompt: Empty array "
                                   "detected. Do not use an empty array for the prompt.", "error_type": "validation"}),
    ]
    for body, error in refusals:
        r = httpx.post(f"{app}/v1/completions", json={**body, "stream": stream}, timeout=60)
        assert (r.status_code, r.json()) == (422, error)


def test_completions_of_two_prompts_add_up_their_headers_and_name_the_served_model(app):
    r = httpx.post(f"{app}/v1/completions", timeout=60,
                   json={"prompt": [P, "Hello"], "max_tokens": 3, "temperature": 0, "model": "some-name"})
    assert r.status_code == 200 and sorted(c["index"] for c in r.json()["choices"]) == [0, 1]
    assert r.json()["model"] == "neuron-serve/tiny-llama"  # TGI names its model here, whatever the request says
    assert r.headers["x-generated-tokens"] == "6" and r.headers["x-prompt-tokens"] == "9"  # 6 + 3, with BOS
    assert int(r.headers["x-total-time"]) >= int(r.headers["x-inference-time"])
    assert r.headers["x-compute-type"] == "torch"  # no COMPUTE_TYPE: the backend


def test_chat_rules(app):
    hi = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]

    def chat(**body):
        return httpx.post(f"{app}/v1/chat/completions", json={"messages": hi, "max_tokens": 2, **body}, timeout=60)

    # presence_penalty is TGI's repetition_penalty less 2: -2 is a penalty of 0
    r = chat(presence_penalty=-2.0)
    assert (r.status_code, r.json()["error"]) == (422, "Input validation error: `repetition_penalty` must be strictly positive")
    r = chat(messages=[{"role": "user"}])
    assert r.status_code == 422 and r.json()["error"] == ("Failed to deserialize the JSON body into the target type: "
                                                          "messages.0: data did not match any variant of untagged enum MessageBody")
    refused = chat(tools=tools)
    assert refused.status_code == 422 and refused.json()["error_type"] == "tool_error"
    assert chat(tools=tools, tool_choice="none").status_code == 200  # served as a plain chat, as TGI does
    r = chat(tools=tools, response_format={"type": "json", "value": {"type": "object"}})
    assert (r.status_code, r.json()) == (422, {"error": "Tool error: Grammar and tools are mutually exclusive", "error_type": "tool_error"})


@pytest.mark.parametrize("body, content_type, status, error_type, message", [
    ('{"inputs": "x", "parameters": {"temperature": "hot"}}', "application/json", 422, "validation",
     "Failed to deserialize the JSON body into the target type: parameters.temperature: Input should be a valid number"),
    ('{"inputs": "x", "parameters": {"max_new_tokens": 20.0}}', "application/json", 422, "validation",
     "Failed to deserialize the JSON body into the target type: parameters.max_new_tokens: Input should be a valid integer"),
    ('{"inputs": "x", "parameters": {"max_new_tokens": -1}}', "application/json", 422, "validation",
     "Failed to deserialize the JSON body into the target type: parameters.max_new_tokens: Input should be greater than or equal to 0"),
    ('{"inputs": "x", "parameters": {"do_sample": null}}', "application/json", 422, "validation",
     "Failed to deserialize the JSON body into the target type: parameters.do_sample: Input should be a valid boolean"),
    ('{"parameters": {}}', "application/json", 422, "validation",
     "Failed to deserialize the JSON body into the target type: inputs: Field required"),
    ('{"inputs": "x", "parameters": {"stop": "\\n"}}', "application/json", 422, "validation",
     "Failed to deserialize the JSON body into the target type: parameters.stop: Input should be a valid array"),
    ('{"inputs": ', "application/json", 400, "invalid_json", "Failed to parse the request body as JSON"),
    ('{"inputs": "x"}', "text/plain", 415, "unsupported_media_type", "Expected request with `Content-Type: application/json`"),
])
def test_malformed_bodies(app, body, content_type, status, error_type, message):
    r = httpx.post(f"{app}/generate", content=body, headers={"content-type": content_type}, timeout=60)
    assert r.status_code == status and r.json()["error_type"] == error_type
    assert r.json()["error"].startswith(message)
