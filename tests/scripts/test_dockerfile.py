"""The Dockerfile, read with a small parser (no Docker engine here): pinned Neuron base, /data, ports, the command."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

DOCKERFILE = Path(__file__).resolve().parents[2] / "Dockerfile"
ENTRYPOINT = DOCKERFILE.parent / "scripts" / "container_start.sh"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += stripped[:-1] + " " if stripped.endswith("\\") else stripped
        if not stripped.endswith("\\"):
            keyword, _, args = pending.partition(" ")
            out.append((keyword.upper(), args.strip()))
            pending = ""
    return out


@pytest.fixture(scope="module")
def parsed() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def values(parsed, keyword: str) -> list[str]:
    return [args for k, args in parsed if k == keyword]


def env(parsed) -> dict[str, str]:
    return dict(pair.split("=", 1) for args in values(parsed, "ENV") for pair in shlex.split(args))


def test_the_base_image_is_a_pinned_neuron_sdk_image(parsed):
    [image] = values(parsed, "FROM")
    name, _, tag = image.split()[0].rpartition(":")
    assert "/" not in tag and tag and tag != "latest", f"FROM {image}: pin a tag"
    assert "neuron" in name and "sdk2." in tag


def test_the_project_is_installed_with_its_neuron_extra(parsed):
    runs = " ".join(values(parsed, "RUN"))
    assert "pip install" in runs and "'.[neuron]'" in runs
    assert "--extra-index-url https://pip.repos.neuron.amazonaws.com" in runs
    assert "torch==" not in runs  # the base image's Neuron torch, never the CPU pin


def test_data_volume_neuron_tools_and_ports(parsed):
    variables = env(parsed)
    assert variables["HF_HOME"] == "/data"
    assert "/opt/aws/neuron/bin" in variables["PATH"].split(":")
    assert values(parsed, "VOLUME") == ["/data"]
    ports = {p for args in values(parsed, "EXPOSE") for p in args.split()}
    assert {"80", "8265", "8080"} <= ports
    assert variables["PORT"] == "80"  # the API where TGI's images have it: `docker run -p 8080:80`
    [check] = values(parsed, "HEALTHCHECK")
    assert "neuron-serve.port" in check and "/health" in check  # the port the entrypoint chose


def test_compiled_models_and_downloads_are_kept_on_the_data_volume(parsed, monkeypatch):
    """A restarted container (or KubeRay pod, same image) finds what the last one compiled and downloaded."""
    from neuron_serve.backends.neuron_models import cache_root
    from neuron_serve.config import Config

    variables = env(parsed)
    for name in ("HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.setenv(name, variables[name])
    assert cache_root(Config()).is_relative_to("/data")
    assert variables["HF_HOME"].startswith("/data") and variables["NEURON_COMPILE_CACHE_URL"].startswith("/data/")


def test_the_entrypoint_starts_ray_and_serve_run_and_drains_on_sigterm(parsed):
    [entrypoint] = values(parsed, "ENTRYPOINT")  # not the base image's TorchServe entrypoint
    script = json.loads(entrypoint)[0]
    assert values(parsed, "CMD") == ["[]"]  # what follows the image name is the script's arguments
    assert any(script in args.split() for args in values(parsed, "COPY"))  # the image has it
    text = (DOCKERFILE.parent / script).read_text()
    assert "serve run serve_config.yaml" in text and "--metrics-export-port=8080" in text
    assert "trap 'python -m deployments.drain" in text and "TERM" in text
    assert subprocess.run(["sh", "-n", str(DOCKERFILE.parent / script)]).returncode == 0


def fake_cluster(tmp_path: Path, serve_blocks: bool = False) -> dict[str, str]:
    """`ray` and `serve` that write down the TGI variables `serve run` would read (`serve run` runs until
    stopped when `serve_blocks`), and a `python` whose drain only writes itself down: the test cluster of
    this session must not be drained."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("ray", "serve"):
        block = "exec sleep 600\n" if tool == "serve" and serve_blocks else ""
        (bin_dir / tool).write_text(f"#!/bin/sh\necho \"{tool} $*: MODEL_ID=$MODEL_ID MAX_BATCH_SIZE=$MAX_BATCH_SIZE "
                                    f"MAX_INPUT_LENGTH=$MAX_INPUT_LENGTH\" >> {tmp_path}/calls\n"
                                    f"if [ \"$1\" = run ]; then cp \"$2\" {tmp_path}/served.yaml; fi\n{block}")
        (bin_dir / tool).chmod(0o755)
    (bin_dir / "python").write_text(f'#!/bin/sh\nif [ "$2" = deployments.drain ]; then echo drain >> {tmp_path}/calls; '
                                    f'exit 0; fi\nexec {sys.executable} "$@"\n')  # the launcher runs for real
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}
    env.pop("PORT", None)  # as outside the image
    return env


def test_sigterm_drains_then_stops_serve_and_ray(tmp_path):
    """`docker stop`: the apps drain, then `serve run` and Ray stop, well before Docker's SIGKILL."""
    calls = tmp_path / "calls"
    container = subprocess.Popen(["sh", str(ENTRYPOINT)], env=fake_cluster(tmp_path, serve_blocks=True),
                                 cwd=DOCKERFILE.parent)
    try:
        deadline = time.monotonic() + 30
        while not (calls.exists() and "serve run" in calls.read_text()):
            assert time.monotonic() < deadline and container.poll() is None
            time.sleep(0.1)
        container.send_signal(signal.SIGTERM)
        assert container.wait(timeout=15) == 0
    finally:
        container.kill()
    lines = [line.split(":")[0] for line in calls.read_text().splitlines()]
    assert lines == ["ray start --head --dashboard-host=0.0.0.0 --metrics-export-port=8080 --disable-usage-stats",
                     "serve run serve_config.yaml", "drain", "ray stop"]


def test_tgi_launcher_arguments_after_the_image_name_become_tgi_variables(tmp_path):
    """`docker run IMAGE --model-id aws-neuron/m --max-batch-size 1 --max-input-length 1024`, as neuronx-tgi."""
    env = fake_cluster(tmp_path)
    args = ["--model-id", "aws-neuron/m", "--max-batch-size", "1", "--max-input-length=1024"]
    done = subprocess.run(["sh", str(ENTRYPOINT), *args], env=env, cwd=DOCKERFILE.parent, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert "serve run serve_config.yaml: MODEL_ID=aws-neuron/m MAX_BATCH_SIZE=1 MAX_INPUT_LENGTH=1024" in calls
    (tmp_path / "calls").unlink()
    refused = subprocess.run(["sh", str(ENTRYPOINT), "--sharded", "true"], env=env, cwd=DOCKERFILE.parent,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "--sharded is not a setting of neuron-serve" in refused.stderr
    assert not (tmp_path / "calls").exists()  # nothing started for it


def test_the_api_listens_on_tgi_port_variable_or_argument(tmp_path):
    """The image sets PORT=80 (`docker run -p 8080:80`, as TGI's); `-e PORT` or `--port` moves it, and only the
    port: `serve run` gets serve_config.yaml with `http_options.port` replaced, which Serve's schema accepts."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    original = yaml.safe_load((DOCKERFILE.parent / "serve_config.yaml").read_text())
    for env_port, args, expected in (("80", [], 80), ("80", ["--port", "8081"], 8081), (None, [], None)):
        env = fake_cluster(tmp_path)
        if env_port:
            env["PORT"] = env_port
        done = subprocess.run(["sh", str(ENTRYPOINT), *args], env=env, cwd=DOCKERFILE.parent, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        served = yaml.safe_load((tmp_path / "served.yaml").read_text())
        if expected is None:  # no PORT (the script outside the image): serve_config.yaml as it is
            assert served == original
            continue
        assert served == {**original, "http_options": {**original["http_options"], "port": expected}}
        assert ServeDeploySchema.parse_obj(served).http_options.port == expected
        assert (tmp_path / "neuron-serve.port").read_text().strip() == str(expected)
    (tmp_path / "calls").unlink()
    refused = subprocess.run(["sh", str(ENTRYPOINT), "--port", "http"], env=fake_cluster(tmp_path), cwd=DOCKERFILE.parent,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "PORT must be a TCP port (1-65535), got 'http'" in refused.stderr
    assert not (tmp_path / "calls").exists()  # nothing started for it
