"""Ray Serve's settings (deployments/ray_env.py) reach every Serve process: replicas, controller, proxies."""

from __future__ import annotations

import os

from deployments.ray_env import SERVE_ENV

from ..conftest import SERVE_CONFIG, serve_process_env


def test_serve_config_gives_the_controller_and_proxies_the_replicas_settings():
    assert SERVE_CONFIG["controller_options"] == {"runtime_env": {"env_vars": SERVE_ENV}}


def test_both_deployments_get_them_whatever_config_runs_the_app(tiny_model_dir):
    from deployments.app import build_app

    ingress = build_app({"backend": "simulated", "cores_per_replica": 0})._bound_deployment
    batcher = ingress.init_args[0]._bound_deployment
    for deployment in (ingress, batcher):
        assert deployment.ray_actor_options["runtime_env"]["env_vars"] == SERVE_ENV


def test_the_test_clusters_controller_and_proxy_run_with_them(cluster):
    for title in ("ray::ServeController", "ray::HAProxyManager", "ray::ProxyActor"):
        env = serve_process_env(os.getpid(), title)
        assert {name: env.get(name) for name in SERVE_ENV} == SERVE_ENV, title
