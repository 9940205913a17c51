"""Fixtures shared by every test: the built-in tiny model, its transformers reference, and one Ray cluster.

The cluster (`cluster`, for the serve and reliability suites) lives for the whole session, with fake
NeuronCores, and apps are deployed on it by name. `ray.init(resources={"neuron_cores": 4})`, like
`ray start --head --resources`: Ray sets NEURON_RT_VISIBLE_CORES for replicas that ask for cores
even though there is no device, so pinning is tested for real. Token auth is off for the cluster
and this process alike (a mismatch makes handle calls hang).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

SERVE_CONFIG = yaml.safe_load((Path(__file__).resolve().parents[1] / "serve_config.yaml").read_text())


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from neuron_serve.tiny_model import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from neuron_serve.model_files import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="session")
def hf_model(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def reference(hf_model):
    """Greedy tokens from transformers' own `generate`, memoized: reference(input_ids, n) -> list[int]."""
    import torch

    cache: dict = {}

    def generate(input_ids, max_new_tokens: int, **kwargs) -> list[int]:
        key = (tuple(input_ids), max_new_tokens, tuple(sorted(kwargs.items())))
        if key not in cache:
            ids = torch.tensor([list(input_ids)])
            with torch.inference_mode():
                out = hf_model.generate(
                    ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                    pad_token_id=hf_model.generation_config.eos_token_id[0], **kwargs,
                )
            cache[key] = out[0, ids.shape[1]:].tolist()
        return cache[key]

    return generate


# -- the Ray cluster ----------------------------------------------------------------------------


def wait_healthy(url: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/health did not answer 200 within {timeout}s")


def ray_logs() -> Path:
    """The log directory of this process's Ray session (the `cluster` fixture's): replicas' files under `serve/`."""
    import ray

    return Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"


def replica_logs(app: str = "main", deployment: str = "*") -> list[Path]:
    """The log files of `app`'s replicas (of `deployment`)."""
    return list((ray_logs() / "serve").glob(f"replica_{app}_{deployment}_*.log"))


def replica_lines(request_id: str, app: str = "main", deployment: str = "*") -> list[str]:
    """The lines of those files that carry `request_id`."""
    return [line for f in replica_logs(app, deployment) for line in f.read_text().splitlines() if request_id in line]


def logged_line(request_id: str, marker: str, app: str, deployment: str = "NeuronBatcher", deadline_s: float = 20) -> str:
    """The one line of `app`'s `deployment` with `marker` for `request_id` (the files are written a moment later)."""
    deadline = time.monotonic() + deadline_s
    while True:
        lines = [line for line in replica_lines(request_id, app, deployment) if marker in line]
        if lines or time.monotonic() > deadline:
            assert len(lines) == 1, (marker, lines)
            return lines[0]
        time.sleep(0.5)


def load_script(name: str):
    """`scripts/<name>.py` as a module, registered under `name` (its dataclasses look their module up by name)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def titled_descendant(root: int, title: str, read=lambda process: process.name()):
    """`read` of a process whose command line holds `title` among `root`'s descendants, or None (one that
    exits meanwhile, as HAProxy's reloads end some, is skipped)."""
    import psutil

    for child in psutil.Process(root).children(recursive=True):
        try:
            if title in " ".join(child.cmdline()):
                return read(child)
        except psutil.Error:
            continue
    return None


def descendant(root: int, title: str, timeout: float = 60.0, read=lambda process: process.name()):
    """`titled_descendant`, waiting for it."""
    deadline = time.monotonic() + timeout
    while (found := titled_descendant(root, title, read)) is None:
        assert time.monotonic() < deadline, f"no {title} process under pid {root}"
        time.sleep(0.5)
    return found


def serve_process_env(root: int, title: str, timeout: float = 60.0) -> dict[str, str]:
    """The environment of the Serve process titled `title` (e.g. "ray::ProxyActor") among `root`'s descendants."""
    return descendant(root, title, timeout, read=lambda process: process.environ())


def _run_quietly(application, name: str) -> None:
    from ray import serve

    try:
        serve.run(application, name=name, route_prefix=f"/{name}")
    except Exception:
        pass


class Cluster:
    def __init__(self, http_port: int, metrics_port: int):
        self.http = f"http://127.0.0.1:{http_port}"
        self.metrics_port = metrics_port
        self.apps: list[str] = []

    def deploy(self, name: str, args: dict, wait: bool = True) -> str:
        """Deploy neuron-serve under /<name> with `args` (serve_config args); its base URL."""
        from ray import serve

        from deployments.app import build_app

        application = build_app(args)
        self.apps.append(name)
        url = f"{self.http}/{name}"
        if not wait:  # serve.run waits for every deployment; here the caller watches the app come up
            threading.Thread(target=_run_quietly, args=(application, name), daemon=True).start()
            return url
        serve.run(application, name=name, route_prefix=f"/{name}")
        wait_healthy(url)
        return url

    def delete(self, name: str) -> None:
        from ray import serve

        serve.delete(name)
        self.apps.remove(name)


@pytest.fixture(scope="session")
def cluster():
    import ray
    from ray import serve

    bench = load_script("bench")
    http, metrics = bench.free_port(), bench.free_port()
    # HAProxy's side ports (stats, Prometheus, the fallback proxy) are fixed by default: free ones for
    # this cluster's processes only (they inherit the environment Ray starts in), so that a `serve run`
    # beside it (test_serve_run) gets the defaults, as on a fresh machine.
    side_ports = bench.haproxy_side_ports()
    os.environ.update(side_ports)
    try:
        # A cluster of this process's own (address="local"): shutting it down stops only its processes, so
        # a benchmark or another Ray cluster on the machine is left alone.
        ray.init(address="local", num_cpus=16, resources={"neuron_cores": 4}, include_dashboard=False,
                 _metrics_export_port=metrics, logging_level="ERROR", log_to_driver=False)
    finally:
        for name in side_ports:
            del os.environ[name]
    try:
        # Serve's controller and proxy with serve_config.yaml's settings, as `serve run` starts them.
        serve.start(http_options={"host": "127.0.0.1", "port": http}, controller_options=SERVE_CONFIG["controller_options"])
        yield Cluster(http, metrics)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


