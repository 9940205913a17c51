"""/info, /health, /metrics, /tokenize, /docs through Ray Serve."""

from __future__ import annotations

import re
import shutil
import time

import httpx
import pytest

from ..conftest import logged_line, ray_logs, replica_lines, replica_logs
from .conftest import SIDE_ARGS


def test_info_fields(app):
    info = httpx.get(f"{app}/info", timeout=30).json()
    for key, value in {"model_id": "neuron-serve/tiny-llama", "model_pipeline_tag": "text-generation",
                       "max_concurrent_requests": 128, "max_best_of": 2, "max_stop_sequences": 4,
                       "max_input_tokens": 128, "max_total_tokens": 256, "max_client_batch_size": 4,
                       "max_batch_size": 4, "max_input_length": 128, "max_batch_total_tokens": 1024,
                       "insertion": "insert", "backend": "torch"}.items():
        assert info[key] == value, key
    for key in ("model_sha", "validation_workers", "router", "version", "sha", "docker_label", "model_dtype",
                "model_device_type", "max_batch_prefill_tokens"):
        assert key in info
    assert {r["batch_size"] for r in info["replicas"]} == {4}
    assert all(r["healthy"] and r["backend"] == "torch cpu float32" for r in info["replicas"])


def test_health_and_ping(app):
    for path in ("/health", "/ping"):
        r = httpx.get(f"{app}{path}", timeout=30)
        assert r.status_code == 200 and r.content == b""


def test_health_is_503_while_no_replica_can_generate(cluster, tiny_model_dir, tmp_path):
    # A model whose tokenizer and config load (the ingress comes up) but whose weights are missing:
    # batcher replicas fail to start, and /health says so at once instead of hanging.
    broken = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    url = cluster.deploy("broken", {**SIDE_ARGS, "model_id": str(broken), "health_probe_timeout_s": 2}, wait=False)
    try:
        deadline = time.monotonic() + 120
        statuses = []
        while time.monotonic() < deadline and len([s for s in statuses if s == 503]) < 3:
            try:
                statuses.append(httpx.get(f"{url}/health", timeout=30).status_code)
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert statuses.count(503) >= 3 and 200 not in statuses
        body = httpx.get(f"{url}/health", timeout=30).json()
        assert body == {"error": "unhealthy", "error_type": "healthcheck"}
    finally:
        cluster.delete("broken")


def test_metrics_expose_tgi_names_aggregated_over_replicas(app, cluster):
    for _ in range(3):
        assert httpx.post(f"{app}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 4}}, timeout=60).status_code == 200
    httpx.post(f"{app}/generate", json={"inputs": "", "parameters": {}}, timeout=60)  # a validation failure
    wanted = ["tgi_request_count ", "tgi_request_success ", 'tgi_request_failure{err="validation"}',
              'tgi_batch_inference_count{method="decode"}', 'tgi_batch_inference_count{method="prefill"}',
              "tgi_request_duration_bucket{le=", "tgi_batch_current_size ", "tgi_queue_size ",
              'tgi_batch_forward_duration_count{method="decode"}', "tgi_request_input_length_sum ",
              "tgi_batch_max_total_tokens 2048", "tgi_batch_current_max_tokens "]  # 2 replicas x batch 4 x 256
    deadline = time.monotonic() + 60
    while True:
        response = httpx.get(f"{app}/metrics", timeout=30)
        text = response.text
        if all(w in text for w in wanted) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert response.headers["content-type"].startswith("text/plain")
    missing = [w for w in wanted if w not in text]
    assert not missing, missing
    assert "ray_" not in text and "replica=" not in text and "neuron_serve" not in text  # TGI's names alone
    assert "# TYPE tgi_request_duration histogram" in text and "# TYPE tgi_request_count counter" in text
    # Ray's own Prometheus export keeps the per-replica, per-core-group view, and the series TGI has not.
    ray_page = httpx.get(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=30).text
    assert 'cores="0,1"' in ray_page and 'cores="2,3"' in ray_page and "ray_tgi_batch_current_size" in ray_page
    for series in ("ray_neuron_serve_time_to_first_token_count", "ray_neuron_serve_inter_token_latency_count",
                   "ray_neuron_serve_batcher_queue_size"):
        assert any(line.startswith(series + "{") and 'replica="' in line and 'cores="' in line
                   for line in ray_page.splitlines()), series


def test_metrics_sums_are_exact_and_bucket_bounds_are_tgis(cluster):
    """Ray rebuilds each histogram's `_sum` from its bucket midpoints (1 token would count as 1.28 here);
    /metrics prints the exact totals, and writes bucket bounds as TGI does. As TGI, durations are those
    of what succeeded: a refused request records no validation time, a failed forward no duration."""
    from ray import serve

    url = cluster.deploy("sums", {**SIDE_ARGS, "num_replicas": 1, "fault_injection": True})
    try:
        generated = prompt = hi_tokens = 0
        for max_new_tokens, text in [(1, "Hi"), (3, "Hello there"), (7, "Once upon a time")]:
            r = httpx.post(f"{url}/generate", json={"inputs": text, "parameters": {"max_new_tokens": max_new_tokens}},
                           timeout=60)
            assert r.status_code == 200, r.text
            generated += int(r.headers["x-generated-tokens"])
            prompt += int(r.headers["x-prompt-tokens"])
            hi_tokens = hi_tokens if text != "Hi" else int(r.headers["x-prompt-tokens"])
        refused = httpx.post(f"{url}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 500}}, timeout=60)
        assert refused.status_code == 422
        serve.get_deployment_handle("NeuronBatcher", app_name="sums").inject_fault.remote("prefill", 1).result()
        failed = httpx.post(f"{url}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}, timeout=60)
        assert failed.status_code == 424  # validated (its lengths count), then its prefill failed
        wanted = ["tgi_request_count 5", "tgi_request_success 3", "tgi_request_validation_duration_count 3",
                  "tgi_request_duration_count 3", f"tgi_request_generated_tokens_sum {generated}",
                  f"tgi_request_input_length_sum {prompt + hi_tokens}", "tgi_request_max_new_tokens_sum 13",
                  'tgi_batch_inference_failure{method="prefill"} 1']
        deadline = time.monotonic() + 60
        while True:
            lines = httpx.get(f"{url}/metrics", timeout=30).text.splitlines()
            if all(w in lines for w in wanted) or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert [w for w in wanted if w not in lines] == [], [line for line in lines if "_sum" in line]
        values = dict(line.rsplit(" ", 1) for line in lines if line and not line.startswith("#"))
        # Every successful prefill (the deploy's health probe among them) has its duration; the failed one none.
        prefills = values['tgi_batch_inference_success{method="prefill"}']
        assert int(prefills) >= 3 and values['tgi_batch_inference_duration_count{method="prefill"}'] == prefills
        # TGI's first duration bound, 0.0001 x 1.5, in Rust's shortest form.
        assert any(line.startswith('tgi_request_duration_bucket{le="0.00015000000000000001"}') for line in lines)
        assert not [line for line in lines if "exact" in line]
    finally:
        cluster.delete("sums")


def test_an_idle_replica_keeps_reporting_its_batch(cluster):
    """Gauges as TGI shows them at any time: an idle batch is 0 rows busy, 0 queued, and its capacity.
    Ray's agent drops a gauge not set again within two exports (20 s), and an idle replica steps no more."""
    url = cluster.deploy("idle", {**SIDE_ARGS, "num_replicas": 1})  # its health probe was its last step
    wanted = ["tgi_batch_max_total_tokens 512", "tgi_batch_current_size 0", "tgi_queue_size 0"]  # 2 rows x 256

    def reported() -> bool:
        text = httpx.get(f"{url}/metrics", timeout=30).text
        return all(w in text for w in wanted)

    try:
        deadline = time.monotonic() + 60
        while not reported():
            assert time.monotonic() < deadline
            time.sleep(2)
        time.sleep(25)
        assert reported()
    finally:
        cluster.delete("idle")


def test_tokenize_gives_byte_offsets(app, tokenizer):
    text = "Hello 🚀 world"
    tokens = httpx.post(f"{app}/tokenize", json={"inputs": text}, timeout=30).json()
    assert [t["id"] for t in tokens] == tokenizer(text).input_ids
    assert tokens[0] == {"id": tokenizer.bos_token_id, "text": "", "start": 0, "stop": 0}
    data = text.encode()
    assert b"".join(data[t["start"]:t["stop"]] for t in tokens[1:]) == data
    assert tokens[-1]["stop"] == len(data) and tokens[-1]["text"] == data[tokens[-1]["start"]:].decode() == " world"
    rocket = next(t for t in tokens if "🚀" in t["text"])
    assert rocket["stop"] - rocket["start"] == len(rocket["text"].encode())  # bytes, not characters
    chat = httpx.post(f"{app}/chat_tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}, timeout=30).json()
    assert chat["templated_text"] == "<|begin_of_text|><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert [t["id"] for t in chat["tokenize_response"]] == tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True)


def test_chat_template_applied_as_tgi_applies_it(app):
    def templated(messages):
        r = httpx.post(f"{app}/chat_tokenize", json={"messages": messages}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["templated_text"]

    assert templated([]) == "<|begin_of_text|><|im_start|>assistant\n"
    # A final assistant message is continued: cut after its content, trailing whitespace trimmed.
    hi = {"role": "user", "content": "Hi"}
    assert templated([hi, {"role": "assistant", "content": "Sure  "}]).endswith("<|im_start|>assistant\nSure")
    call = {"id": "0", "type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
    text = templated([hi, {"role": "assistant", "tool_calls": [call]}, {"role": "tool", "content": "21C"}])
    assert ('<|im_start|>assistant\n[{"id":"0","type":"function","function":{"description":null,"name":"weather",'
            '"arguments":"{\\"city\\":\\"Paris\\"}"}}]<|im_end|>') in text


def test_unknown_routes_and_methods_answer_in_tgi_error_shape_and_head_works(app):
    r = httpx.get(f"{app}/no-such-route", timeout=30)
    assert (r.status_code, r.json()) == (404, {"error": "Not Found", "error_type": "not_found"})
    r = httpx.get(f"{app}/generate", timeout=30)
    assert (r.status_code, r.json()) == (405, {"error": "Method Not Allowed", "error_type": "method_not_allowed"})
    assert r.headers["allow"] == "POST"
    for path in ("/health", "/info", "/metrics", "/v1/models"):
        head, get = httpx.head(f"{app}{path}", timeout=30), httpx.get(f"{app}{path}", timeout=30)
        assert (head.status_code, head.content) == (200, b""), path
        assert head.headers.get("content-type") == get.headers.get("content-type"), path


def test_any_origin_may_call_when_none_is_configured(app):
    """TGI's default CORS: every origin, GET and POST, with the JSON content type (the streams too)."""
    preflight = httpx.options(f"{app}/generate_stream", timeout=30, headers={
        "origin": "https://ui.example", "access-control-request-method": "POST",
        "access-control-request-headers": "content-type"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "*"
    with httpx.stream("POST", f"{app}/generate_stream", headers={"origin": "https://ui.example"}, timeout=60,
                      json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}) as r:
        assert r.headers["access-control-allow-origin"] == "*"
        assert any(line.startswith("data:") for line in r.iter_lines())


def test_docs_and_openapi(app):
    spec = httpx.get(f"{app}/api-doc/openapi.json", timeout=30).json()
    for path in ("/generate", "/generate_stream", "/", "/v1/chat/completions", "/v1/completions", "/v1/models",
                 "/tokenize", "/chat_tokenize", "/invocations", "/health", "/ping", "/info", "/metrics"):
        assert path in spec["paths"], path
    body = spec["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/GenerateRequest"}
    schemas = spec["components"]["schemas"]
    assert {"GenerateRequest", "GenerateParameters", "GenerateResponse", "Details", "Token", "StreamResponse",
            "ErrorResponse", "Info", "ChatRequest", "ChatCompletion", "CompletionRequest"} <= set(schemas)
    assert set(schemas["GenerateParameters"]["properties"]) == {
        "best_of", "temperature", "repetition_penalty", "frequency_penalty", "top_k", "top_p", "typical_p",
        "do_sample", "max_new_tokens", "return_full_text", "stop", "truncate", "watermark", "details",
        "decoder_input_details", "seed", "top_n_tokens", "grammar", "adapter_id"}
    docs = httpx.get(f"{app}/docs", timeout=30)
    assert docs.status_code == 200 and "swagger" in docs.text.lower() and "openapi.json" in docs.text


@pytest.mark.parametrize("body", [
    {"inputs": "Hello", "parameters": {"max_new_tokens": 3}},
    {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3},
    {"prompt": "Hello", "max_tokens": 3},
])
def test_invocations_dispatches_like_sagemaker(app, body):
    r = httpx.post(f"{app}/invocations", json=body, timeout=60)
    assert r.status_code == 200
    if "inputs" in body:
        assert isinstance(r.json(), list)
    else:
        assert r.json()["object"] in ("chat.completion", "text_completion")


def test_one_structured_log_line_per_request_without_the_prompt(app):
    prompt = "A secret prompt that must not be logged"
    r = httpx.post(f"{app}/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 3}}, timeout=60)
    line = logged_line(r.headers["x-request-id"], "request done:", "main")
    assert re.search(r"replica=\w+ cores=(0,1|2,3) input_tokens=\d+ output_tokens=3 finish=length replica_queue_ms=[\d.]+ "
                     r"inference_ms=[\d.]+", line), line
    everything = "".join(f.read_text() for f in replica_logs())
    assert prompt not in everything


def test_per_request_lines_stay_off_stderr_and_lifecycle_lines_do_not(app):
    """Serve's access lines and our `request done:` go to the replicas' log files only: on stderr each would
    travel on to `serve run`'s console (deployments/ray_env.py). A replica's start still shows there."""
    r = httpx.post(f"{app}/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}}, timeout=60)
    request_id = r.headers["x-request-id"]
    expected = {"request done:": r"request done:", "the ingress's access line": r"POST \S*/generate 200",
                "the batcher's": r"CALL generate OK"}
    deadline = time.monotonic() + 20
    while True:
        in_files = replica_lines(request_id)
        missing = [name for name, pattern in expected.items() if not any(re.search(pattern, x) for x in in_files)]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not missing, in_files
    stderr = "".join(f.read_text(errors="replace") for f in ray_logs().glob("worker-*.err"))
    leaked = [line for line in stderr.splitlines()
              if request_id in line and any(re.search(pattern, line) for pattern in expected.values())]
    assert not leaked
    assert "NeuronBatcher" in stderr and "ready in" in stderr
