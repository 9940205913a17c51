"""Ray Serve's cluster settings (deployments/ray_env.py) reach every place that starts Ray."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from deployments.ray_env import CLUSTER_ENV, REPLICA_ENV

from .test_dockerfile import DOCKERFILE, env, instructions

ROOT = Path(__file__).resolve().parents[2]


def test_the_container_starts_ray_with_them():
    assert CLUSTER_ENV.items() <= env(instructions(DOCKERFILE.read_text())).items()


def test_make_runs_serve_and_tests_with_them():
    clean = {k: v for k, v in os.environ.items() if k not in CLUSTER_ENV}
    out = subprocess.run(["make", "-s", "--eval", "_show_env: ; @env", "_show_env"], cwd=ROOT, env=clean,
                         capture_output=True, text=True, check=True).stdout
    seen = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert CLUSTER_ENV.items() <= seen.items()


def test_the_test_cluster_runs_with_them():
    assert all(os.environ.get(name) == value for name, value in CLUSTER_ENV.items())


def test_both_deployments_get_them_even_where_ray_was_started_without(tiny_model_dir):
    from deployments.app import build_app

    ingress = build_app({"backend": "simulated", "cores_per_replica": 0})._bound_deployment
    batcher = ingress.init_args[0]._bound_deployment
    for deployment in (ingress, batcher):
        assert {**REPLICA_ENV, **CLUSTER_ENV}.items() <= deployment.ray_actor_options["runtime_env"]["env_vars"].items()
