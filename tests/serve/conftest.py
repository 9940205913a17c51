"""One Ray cluster for the whole test session, with fake NeuronCores, and apps deployed on it by name.

`ray.init(resources={"neuron_cores": 4})`, like `ray start --head --resources`: Ray sets
NEURON_RT_VISIBLE_CORES for replicas that ask for cores even though there is no device, so pinning
is tested for real. Token auth is
off for the cluster and this process alike (a mismatch makes handle calls hang).
"""

from __future__ import annotations

import os
import socket
import threading
import time

import httpx
import pytest

os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

    http, metrics = free_port(), free_port()
    # A cluster of this process's own (address="local"): shutting it down stops only its processes, so a
    # benchmark or another Ray cluster on the machine is left alone.
    ray.init(address="local", num_cpus=8, resources={"neuron_cores": 4}, include_dashboard=False,
             _metrics_export_port=metrics, logging_level="ERROR", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http})
        yield Cluster(http, metrics)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


# The main app: 4 fake cores, 2 per replica → two pinned replicas running the torch backend.
MAIN_ARGS = {"backend": "torch", "cores_per_replica": 2, "max_batch_size": 4, "max_total_tokens": 256,
             "max_input_tokens": 128, "replica_cpus": 1}
# Side apps run CPU replicas (cores_per_replica 0), leaving the fake cores to the main app.
SIDE_ARGS = {"backend": "torch", "cores_per_replica": 0, "max_batch_size": 2, "max_total_tokens": 256,
             "max_input_tokens": 128, "replica_cpus": 1}


@pytest.fixture(scope="session")
def app(cluster) -> str:
    return cluster.deploy("main", MAIN_ARGS)
