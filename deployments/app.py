"""The application builder named in serve_config.yaml: typed args in, the deployment graph out.

This is the one place that decides where batchers run. When the cluster has `neuron_cores`, each
NeuronBatcher replica asks for `cores_per_replica` of them (Ray then sets NEURON_RT_VISIBLE_CORES
for it), there are `cores // cores_per_replica` replicas unless told otherwise, and `backend: auto`
means the Neuron backend. Without `neuron_cores` (a laptop, CI), the same app runs CPU replicas of
the torch backend. Either way the decision is logged.
"""

import logging
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve
from ray.serve import Application

from neuron_serve.config import Config, load_config
from neuron_serve.errors import ConfigError
from neuron_serve.loading import model_limits, settle_config, settle_cores
from neuron_serve.model_files import resolve_model_dir

from .batcher import NeuronBatcher
from .ingress import Ingress
from .ray_env import SERVE_ENV

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Layout:
    backend: str  # what `backend: auto` became
    neuron_cores: int  # per replica; 0 where the cluster has none
    num_replicas: int | None  # None when autoscaling
    reason: str


def plan_layout(config: Config, cluster_cores: float) -> Layout:
    """Where batchers run.

    `backend: neuron` always asks for cores (an autoscaler may still be adding inf2 nodes); `auto`
    means Neuron when the cluster has a core group to give, torch on CPU otherwise;
    `cores_per_replica: 0` means CPU replicas; the torch and simulated backends take core groups
    where there are some, so that pinning works the same on fake cores.
    """
    group, cores = config.cores_per_replica, int(cluster_cores)
    on_cores = config.backend == "neuron" or (group > 0 and cores >= group)
    if on_cores and group == 0:
        raise ConfigError("`cores_per_replica` must be > 0 for the neuron backend")
    if on_cores:
        backend = "neuron" if config.backend == "auto" else config.backend
        replicas = config.num_replicas or max(1, cores // group)
        reason = f"the cluster has {cores} neuron_cores: {replicas} replica(s) x {group} cores, backend {backend}"
    else:
        backend = "torch" if config.backend == "auto" else config.backend
        replicas = config.num_replicas or 1
        why = "cores_per_replica is 0" if group == 0 else f"the cluster has no group of {group} neuron_cores ({cores})"
        reason = f"{why}: {replicas} CPU replica(s), backend {backend}"
    if config.autoscaling_config:
        reason += f", autoscaling {config.autoscaling_config}"
    return Layout(backend, group if on_cores else 0, None if config.autoscaling_config else replicas, reason)


def _cluster_neuron_cores() -> float:
    return ray.cluster_resources().get("neuron_cores", 0.0) if ray.is_initialized() else 0.0


def build_app(args: dict[str, Any]) -> Application:
    """Ray Serve builder: `import_path: deployments.app:build_app`, `args:` = `Config` fields."""
    config = load_config(args)
    model_dir = resolve_model_dir(config, weights=False)
    config = settle_cores(config, model_dir)
    layout = plan_layout(config, _cluster_neuron_cores())
    logger.info("neuron-serve: %s", layout.reason)
    config = settle_config(config.model_copy(update={"backend": layout.backend}), model_dir)
    slots = model_limits(config, model_dir).max_batch_size

    actor_options: dict[str, Any] = {"num_cpus": config.replica_cpus, "runtime_env": {"env_vars": SERVE_ENV}}
    if layout.neuron_cores:
        actor_options["resources"] = {"neuron_cores": layout.neuron_cores}
    replicas: dict[str, Any] = (
        {"autoscaling_config": config.autoscaling_config} if layout.num_replicas is None
        else {"num_replicas": layout.num_replicas}
    )
    batcher = serve.deployment(NeuronBatcher, name="NeuronBatcher").options(
        ray_actor_options=actor_options,
        # Serve's default of 5 would starve a batch of 8: room for every row, plus a queue.
        max_ongoing_requests=slots + (slots if config.max_queued_per_replica is None else config.max_queued_per_replica),
        health_check_period_s=config.health_check_period_s,
        health_check_timeout_s=config.health_check_timeout_s,
        graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s,
        graceful_shutdown_wait_loop_s=0.5,
        **replicas,
    )
    ingress = serve.deployment(Ingress, name="Ingress").options(
        num_replicas=config.ingress_replicas,
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": SERVE_ENV}},
        # Above the 429 limit, so that excess requests reach the ingress and are refused at once.
        max_ongoing_requests=config.max_concurrent_requests + 100,
        graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s,
        graceful_shutdown_wait_loop_s=0.5,
    )
    return ingress.bind(batcher.bind(config), config)
