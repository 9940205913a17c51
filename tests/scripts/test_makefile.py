"""`make serve`, the README's first command, with a `serve` that writes down what it was asked to run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def make_serve(tmp_path: Path, port: str | None) -> subprocess.CompletedProcess:
    """`make serve` with the install step taken as done, and `serve run` copying its config to served.yaml."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "serve").write_text(f'#!/bin/sh\n[ "$1" = run ] && cp "$2" {tmp_path}/served.yaml\n')
    (bin_dir / "serve").chmod(0o755)
    if not (bin_dir / "python").exists():
        (bin_dir / "python").symlink_to(sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in ("PORT", "MAKEFLAGS")}
    if port is not None:
        env["PORT"] = port  # as TGI's launcher reads it
    return subprocess.run(["make", "--no-print-directory", "-o", "install", "serve", f"BIN={bin_dir}",
                           f"VENV={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_make_serve_runs_serve_config_yaml_on_its_port_or_on_tgi_port_variable(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    original = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    done = make_serve(tmp_path, None)
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load((tmp_path / "served.yaml").read_text()) == original  # Serve's 8000, as written

    done = make_serve(tmp_path, "9001")
    assert done.returncode == 0, done.stderr
    served = yaml.safe_load((tmp_path / "served.yaml").read_text())
    assert served == {**original, "http_options": {**original["http_options"], "port": 9001}}
    assert ServeDeploySchema.model_validate(served).http_options.port == 9001

    (tmp_path / "served.yaml").unlink()
    refused = make_serve(tmp_path, "http")
    assert refused.returncode != 0 and "PORT must be a TCP port (1-65535), got 'http'" in refused.stderr
    assert not (tmp_path / "served.yaml").exists()  # nothing started for it
