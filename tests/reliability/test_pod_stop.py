"""A KubeRay pod that Kubernetes stops (kubectl drain, a spot reclaim, a scale-down) loses no stream.

Kubernetes sends SIGTERM to the pod's `ray start --block`. With RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S,
which the manifest sets (`render_kuberay.pod_drain_s`), Ray drains the node before it stops its
processes: Serve starts the node's replicas elsewhere, stops its own gracefully, and the node stops
once idle. Here each pod is a `ray start --block` process on this host, as in the manifest: a head
with no CPUs, and two inf2 pods with 2 `neuron_cores` each, of which the app's one batcher takes
one. The HTTP proxy stays on the head (`proxy_location: HeadOnly`), because the HAProxies of several
nodes on one host would share its port.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from ..conftest import SERVE_CONFIG, load_script, wait_healthy
from .conftest import SIMULATED, body, newcomer, run, streaming

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TOKENS = 800  # about 10 s a stream, at the simulated backend's 12 ms a step
ARGS = {**SIMULATED, "cores_per_replica": 2, "replica_cpus": 1, "num_replicas": 1, "graceful_shutdown_timeout_s": 30}
APP_CONFIG = {
    **{key: SERVE_CONFIG[key] for key in ("controller_options", "logging_config")},
    "proxy_location": "HeadOnly",
    "applications": [{"name": "pods", "route_prefix": "/", "import_path": "deployments.app:build_app", "args": ARGS}],
}


class Pod:
    """One Ray node as a KubeRay pod runs it: `ray start --block` in the foreground, its own process group."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path):
        self.log = logs / f"{name}.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen([str(BIN / "ray"), "start", "--block", *args], env=env, cwd=ROOT,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_started(self, timeout: float = 90.0) -> Pod:
        """Returns once the node is up, as `ray start` says before it blocks."""
        deadline = time.monotonic() + timeout
        while "will now block forever" not in self.log.read_text():
            assert self.process.poll() is None, f"{self.log.name}: {self.log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"{self.log.name} did not start within {timeout}s"
            time.sleep(0.5)
        return self

    def runs(self, title: str) -> bool:
        """Whether a process titled `title` (a Serve replica's, say) runs on this node."""
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                if title in " ".join(child.cmdline()):
                    return True
            except psutil.Error:
                continue
        return False

    def kill(self) -> None:
        try:
            tree = [psutil.Process(self.process.pid)]
            tree += tree[0].children(recursive=True)
        except psutil.Error:
            return
        for process in tree:
            try:
                process.kill()
            except psutil.Error:
                pass
        self.process.wait()


@pytest.fixture
def pods():
    """A head and two inf2 pods, each draining its node on SIGTERM as the manifest has it; the app on them."""
    render_kuberay = load_script("render_kuberay")
    free_port = load_script("bench").free_port
    drain_s = render_kuberay.pod_drain_s(APP_CONFIG)
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update({"RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": str(drain_s)})
    for name in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                 "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"):
        env[name] = str(free_port())  # not the defaults, which a `serve run` on this machine may hold

    def own_ports() -> list[str]:
        return [f"--{flag}={free_port()}" for flag in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")]

    logs = Path(tempfile.mkdtemp(prefix="pods-", dir="/tmp"))  # short: Ray's socket paths live under it
    gcs, http = free_port(), free_port()
    address = f"127.0.0.1:{gcs}"
    started = [Pod("head", ["--head", f"--port={gcs}", f"--ray-client-server-port={free_port()}", "--num-cpus=0",
                            "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={logs}", *own_ports()],
                   env, logs)]
    try:
        started[0].wait_started()
        inf2 = []
        for i in range(2):  # one at a time: a node started before the head was up never joined, once
            inf2.append(Pod(f"inf2-{i}", [f"--address={address}", "--num-cpus=2", '--resources={"neuron_cores": 2}',
                                          *own_ports()], env, logs))
            started.append(inf2[-1].wait_started())
        config = {**APP_CONFIG, "http_options": {"host": "127.0.0.1", "port": http}}
        (logs / "serve_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        subprocess.run([str(BIN / "serve"), "run", str(logs / "serve_config.yaml"), f"--address={address}",
                        "--non-blocking"], env=env, cwd=ROOT, check=True, timeout=240,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{http}"
        wait_healthy(url)
        yield url, inf2, drain_s
    finally:
        for pod in started:
            pod.kill()
        shutil.rmtree(logs, ignore_errors=True)


def test_a_pod_stopped_by_kubernetes_finishes_its_streams_and_the_app_serves_on(pods):
    url, inf2, drain_s = pods
    [stopped] = [pod for pod in inf2 if pod.runs("NeuronBatcher")]
    [spare] = [pod for pod in inf2 if pod is not stopped]

    async def scenario():
        async with httpx.AsyncClient(timeout=180) as client:
            in_flight = await streaming(client, url, 4, TOKENS)  # all on the one batcher, the stopped pod's
            stopped.process.send_signal(signal.SIGTERM)  # what Kubernetes does to a pod it deletes
            began = time.monotonic()
            newcomers = []
            while not all(task.done() for task in in_flight):  # requests keep coming during the drain
                newcomers.append(asyncio.create_task(newcomer(client, url)))
                await asyncio.sleep(0.5)
            results = await asyncio.gather(*in_flight)
            streams_s = time.monotonic() - began
            await asyncio.to_thread(stopped.process.wait, drain_s + 30)
            return results, await asyncio.gather(*newcomers), streams_s, time.monotonic() - began

    results, newcomers, streams_s, stopped_s = run(scenario())
    assert all(r.complete and len(r.tokens) == TOKENS for r in results), results  # none was cut
    for r in newcomers:  # served by either batcher, or refused cleanly while none was ready
        assert r.complete or (r.failed_cleanly and r.errors[0]["error_type"] in ("overloaded", "unhealthy")), r
    assert any(r.complete for r in newcomers)
    assert streams_s <= stopped_s <= drain_s + 30, (streams_s, stopped_s)  # the pod stopped once its streams ended
    assert spare.runs("NeuronBatcher")  # the batcher moved to the spare pod, which serves on
    r = httpx.post(f"{url}/generate", json=body(5), timeout=60)
    assert r.status_code == 200 and r.json()["generated_text"], r.text
