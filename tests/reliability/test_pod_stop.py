"""A KubeRay pod that Kubernetes stops (kubectl drain, a spot reclaim, a scale-down) loses no stream.

Kubernetes sends SIGTERM to the pod's `ray start --block`. With RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S,
which the manifest sets (`render_kuberay.pod_drain_s`), Ray drains the node before it stops its
processes: Serve starts the node's replicas elsewhere, stops its own gracefully, and the node stops
once idle. Here each pod is a `ray start --block` process on this host, as the manifest starts it,
and the app has one batcher of 2 `neuron_cores`. The HTTP proxy stays on the head
(`proxy_location: HeadOnly`), because the HAProxies of several nodes on one host would share its port.
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

from ..conftest import SERVE_CONFIG, load_script, titled_descendant, wait_healthy
from .conftest import SIMULATED, body, newcomer, run, streaming

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TOKENS = 800  # about 8 s a stream at the simulated backend's 10 ms a step (1B parameters on 2 cores)
ARGS = {**SIMULATED, "cores_per_replica": 2, "replica_cpus": 1, "num_replicas": 1, "graceful_shutdown_timeout_s": 30}
APP_CONFIG = {
    **{key: SERVE_CONFIG[key] for key in ("controller_options", "logging_config")},
    "proxy_location": "HeadOnly",
    "applications": [{"name": "pods", "route_prefix": "/", "import_path": "deployments.app:build_app", "args": ARGS}],
}


class Pod:
    """One Ray node as a KubeRay pod runs it: `ray start --block` in the foreground, in a session of its own."""

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
        return titled_descendant(self.process.pid, title) is not None

    def kill(self) -> None:
        """Every process of the pod: Ray's workers leave the process group `ray start` began, not its session."""
        for process in psutil.process_iter():
            try:
                if os.getsid(process.pid) == self.process.pid:
                    process.kill()
            except (OSError, psutil.Error):
                pass
        self.process.wait()


class Pods:
    """A Ray cluster of pods on this host: a head with no CPUs, as in the manifest, then inf2 pods of 2
    `neuron_cores` each, every one draining its node on SIGTERM for the time the manifest gives it."""

    def __init__(self):
        bench = load_script("bench")
        self.free_port = bench.free_port
        self.drain_s = load_script("render_kuberay").pod_drain_s(APP_CONFIG)
        env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
        env.update({"RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": str(self.drain_s)})
        env.update(bench.haproxy_side_ports())  # not the defaults, which a `serve run` on this machine may hold
        self.env = env
        self.logs = Path(tempfile.mkdtemp(prefix="pods-", dir="/tmp"))  # short: Ray's socket paths live under it
        self.gcs_port, self.http_port = self.free_port(), self.free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.started: list[Pod] = []

    def add_head(self) -> Pod:
        return self._start("head", "--head", f"--port={self.gcs_port}", f"--ray-client-server-port={self.free_port()}",
                           "--num-cpus=0", "--include-dashboard=false", "--disable-usage-stats",
                           f"--temp-dir={self.logs}")

    def _start(self, name: str, *args: str) -> Pod:
        own_ports = [f"--{flag}={self.free_port()}" for flag in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")]
        pod = Pod(name, [*args, *own_ports], self.env, self.logs)
        self.started.append(pod)
        return pod.wait_started()  # one at a time: a node started before the head was up never joined, once

    def add_inf2(self) -> Pod:
        return self._start(f"inf2-{len(self.started)}", f"--address={self.address}", "--num-cpus=2",
                           '--resources={"neuron_cores": 2}')

    def deploy(self, **args) -> None:
        """The app, with `args` over ARGS, deployed on the cluster by `serve run --non-blocking`."""
        config = self.logs / "serve_config.yaml"
        [app] = APP_CONFIG["applications"]
        config.write_text(yaml.safe_dump({**APP_CONFIG, "http_options": {"host": "127.0.0.1", "port": self.http_port},
                                          "applications": [{**app, "args": {**ARGS, **args}}]}))
        subprocess.run([str(BIN / "serve"), "run", str(config), f"--address={self.address}", "--non-blocking"],
                       env=self.env, cwd=ROOT, check=True, timeout=240,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_healthy(self.url)

    def stop(self) -> None:
        for pod in self.started:
            pod.kill()
        shutil.rmtree(self.logs, ignore_errors=True)


@pytest.fixture
def pods():
    cluster = Pods()
    try:
        cluster.add_head()
        yield cluster
    finally:
        cluster.stop()


def stop_pod_mid_streams(pods: Pods, pod: Pod, newcomers: bool = True) -> float:
    """SIGTERM to `pod` while 4 streams run on its batcher (and newcomers keep coming): none is cut, and
    `ray start` exits after them. Returns how long the streams ran on after the SIGTERM."""

    async def scenario():
        async with httpx.AsyncClient(timeout=180) as client:
            in_flight = await streaming(client, pods.url, 4, TOKENS)  # all on the app's one batcher, the pod's
            pod.process.send_signal(signal.SIGTERM)  # what Kubernetes does to a pod it deletes
            began = time.monotonic()
            knocked = []
            while not all(task.done() for task in in_flight):
                assert pod.process.poll() is None, "`ray start` exited while its streams still ran"
                if newcomers:
                    knocked.append(asyncio.create_task(newcomer(client, pods.url)))
                await asyncio.sleep(0.5)
            results = await asyncio.gather(*in_flight)
            streams_s = time.monotonic() - began
            await asyncio.to_thread(pod.process.wait, pods.drain_s + 30)
            return results, await asyncio.wait_for(asyncio.gather(*knocked), 60), streams_s, time.monotonic() - began

    results, knocked, streams_s, stopped_s = run(scenario())
    assert all(r.complete and len(r.tokens) == TOKENS for r in results), results  # none was cut
    for r in knocked:  # served, or refused cleanly
        assert r.complete or (r.failed_cleanly and r.errors[0]["error_type"] in ("overloaded", "unhealthy")), r
    assert not newcomers or any(r.complete for r in knocked)
    assert stopped_s <= pods.drain_s + 30, (streams_s, stopped_s)  # and then it stopped
    return streams_s


def generates(url: str) -> bool:
    r = httpx.post(f"{url}/generate", json=body(5), timeout=60)
    return r.status_code == 200 and bool(r.json()["generated_text"])


def test_a_stopped_pod_finishes_its_streams_while_its_batcher_moves_to_a_spare_pod(pods):
    inf2 = [pods.add_inf2(), pods.add_inf2()]
    pods.deploy()
    [stopped] = [pod for pod in inf2 if pod.runs("NeuronBatcher")]
    [spare] = [pod for pod in inf2 if pod is not stopped]
    stop_pod_mid_streams(pods, stopped)
    assert spare.runs("NeuronBatcher")  # Serve started it there before it stopped the old one
    assert generates(pods.url)


def test_a_stopped_pod_with_nowhere_to_move_finishes_its_streams_then_a_new_pod_serves(pods):
    """The usual case on inf2, where a new replica takes minutes to load: Serve stops the pod's batcher at
    the drain's deadline less its graceful timeout, and the batcher's streams get that timeout whole.
    Requests that come meanwhile wait for a batcher, as Serve holds them until one is up: no newcomers
    here, since one held by an ingress replica on the stopped pod would be cut when the replica's own
    graceful timeout ends."""
    only = pods.add_inf2()
    pods.deploy(simulated_params=3e9)  # 26 ms a step: the streams outlast the batcher's stop
    streams_s = stop_pod_mid_streams(pods, only, newcomers=False)
    assert streams_s > pods.drain_s - ARGS["graceful_shutdown_timeout_s"]  # they were in flight when it stopped
    new = pods.add_inf2()  # as the autoscaler would add one
    wait_healthy(pods.url)
    assert new.runs("NeuronBatcher") and generates(pods.url)
