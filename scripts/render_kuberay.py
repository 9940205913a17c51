#!/usr/bin/env python
"""Render the KubeRay RayService manifest from serve_config.yaml, so the cluster runs what `serve run` runs.

`serve_config.yaml` stays the single source of truth: `render_rayservice` embeds it as the
RayService's `serveConfigV2`, changed in two documented ways only (see `cluster_serve_config`), and
sizes the inf2 worker group from the instance table in `neuron_serve.instances`. Beside it goes
`podmonitor.yaml`, which has Prometheus scrape every pod's Ray metrics. The committed
`deployments/kuberay/` files are this script's output with its defaults; `--check` fails when
they are out of date.

    python scripts/render_kuberay.py [--serve-config serve_config.yaml] [--out deployments/kuberay/rayservice.yaml]
        [--image IMAGE] [--instance-type inf2.48xlarge] [--min-workers 1] [--max-workers 4] [--check]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

from neuron_serve.config import DEFAULT_BATCH_SIZE, load_config
from neuron_serve import instances
from neuron_serve.instances import INSTANCE_TYPES, InstanceType

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = ROOT / "serve_config.yaml"
MANIFEST = ROOT / "deployments" / "kuberay" / "rayservice.yaml"
PODMONITOR = MANIFEST.with_name("podmonitor.yaml")  # written next to the manifest

DEFAULT_IMAGE = "neuron-serve:0.1.0"  # built from the root Dockerfile; push it to ECR and pass --image
DEFAULT_INSTANCE_TYPE = "inf2.48xlarge"
DEFAULT_MIN_WORKERS = 1
DEFAULT_MAX_WORKERS = 4
RAY_VERSION = version("ray")  # the image runs the Ray that pyproject.toml pins
HOST_SHARE = 0.9  # of a node's vCPUs and memory a worker pod asks for; the rest is kubelet's and daemonsets'
METRICS_PORT = 8080  # Ray's Prometheus port on every pod (KubeRay's default too)
POD_LABEL = "neuron-serve/rayservice"  # on every pod of the RayService, for the PodMonitor
HF_TOKEN_KEY = "token"
# A pod Kubernetes stops (kubectl drain, a spot reclaim, a scale-down, a RayService upgrade) gets SIGTERM
# in `ray start --block`, which then drains its Ray node for up to RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S
# (Ray's default 30 s) before stopping its processes: Serve moves the node's replicas away, stopping
# each gracefully (its in-flight requests get `graceful_shutdown_timeout_s`) by the drain's deadline,
# and keeps the node's HTTP proxy until it has drained (at least PROXY_DRAIN_S). See `pod_drain_s`.
PROXY_DRAIN_S = 30  # Serve's minimum for a draining node's proxy (RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S)
DRAIN_MARGIN_S = 15  # Serve checks a draining proxy every 5 s; its control loop and HAProxy's stop take the rest
TEARDOWN_S = 15  # after the drain, `ray start` stops the node's processes before Kubernetes' SIGKILL


def _cores_and_batch(args: dict[str, Any]) -> tuple[int, int]:
    config = load_config(args, environ={})  # the args must be valid neuron-serve settings
    return config.cores_per_replica, config.max_batch_size or DEFAULT_BATCH_SIZE


def replicas_per_node(args: dict[str, Any], instance: InstanceType) -> int:
    """NeuronBatcher replicas one worker pod holds: the node's cores in groups of `cores_per_replica`."""
    group, _ = _cores_and_batch(args)
    if group <= 0 or instance.cores % group:
        raise ValueError(
            f"`cores_per_replica` ({group}) must divide the {instance.cores} NeuronCores of {instance.name}"
        )
    return instance.cores // group


def cluster_serve_config(
    serve_config: dict[str, Any], instance: InstanceType, min_workers: int, max_workers: int
) -> dict[str, Any]:
    """serve_config.yaml as the cluster runs it. Two changes, both to each application's `args`:

    - `backend: auto` becomes `neuron`: the builder may run before an inf2 worker has joined, and
      `auto` would then choose CPU replicas (`neuron` always asks for cores and waits for them);
    - without `num_replicas` or `autoscaling_config`, Serve autoscales the batchers between the
      worker group's bounds (replicas per node x min/max workers), one batch of requests per replica,
      so that the Ray autoscaler adds inf2 nodes when Serve wants more replicas.
    """
    config = copy.deepcopy(serve_config)
    for app in config["applications"]:
        args = app.setdefault("args", {})
        if args.get("backend", "auto") == "auto":
            args["backend"] = "neuron"
        per_node = replicas_per_node(args, instance)  # also checks that the core groups tile a node
        if args.get("num_replicas") is None and args.get("autoscaling_config") is None:
            args["autoscaling_config"] = {
                "min_replicas": per_node * min_workers,
                "max_replicas": per_node * max_workers,
                "target_ongoing_requests": _cores_and_batch(args)[1],
            }
    return config


def pod_drain_s(serve_config: dict[str, Any]) -> int:
    """How long a stopping pod drains its Ray node: the longest `graceful_shutdown_timeout_s` of its apps,
    or the proxy's minimum if longer, and a margin.

    Ray's default (30 s) is shorter than Serve's proxy minimum plus its check, and than any graceful
    timeout above 30 s: past it the node's processes stop, its replicas' streams and its proxy's with
    them. Each pod's `terminationGracePeriodSeconds` adds TEARDOWN_S to it.
    """
    graceful = max(load_config(app.get("args") or {}, environ={}).graceful_shutdown_timeout_s
                   for app in serve_config["applications"])
    return math.ceil(max(graceful, PROXY_DRAIN_S) + DRAIN_MARGIN_S)


def _hf_token_env(name: str) -> dict[str, Any]:
    # Optional, so that public models run without the Secret.
    ref = {"name": f"{name}-hf-token", "key": HF_TOKEN_KEY, "optional": True}
    return {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": ref}}


def _pod_labels(name: str) -> dict[str, Any]:
    """What the PodMonitor selects this RayService's pods by (KubeRay's own labels name the generated RayCluster)."""
    return {"labels": {POD_LABEL: name}}


def _drain_env(drain_s: int) -> dict[str, Any]:
    return {"name": "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "value": str(drain_s)}


def _head_group(name: str, image: str, drain_s: int) -> dict[str, Any]:
    return {
        "serviceType": "ClusterIP",
        "rayStartParams": {
            "num-cpus": "0",  # no replica lands on the head; the Serve controller, proxy and builder need none
            "dashboard-host": "0.0.0.0",  # reachable by KubeRay inside the cluster; not exposed outside it
            "metrics-export-port": str(METRICS_PORT),
        },
        "template": {"metadata": _pod_labels(name), "spec": {
            "terminationGracePeriodSeconds": drain_s + TEARDOWN_S,
            "containers": [{
                "name": "ray-head",
                "image": image,
                "ports": [
                    {"containerPort": 6379, "name": "gcs-server"},
                    {"containerPort": 8265, "name": "dashboard"},
                    {"containerPort": 10001, "name": "client"},
                    {"containerPort": 8000, "name": "serve"},
                    {"containerPort": METRICS_PORT, "name": "metrics"},
                ],
                "env": [_hf_token_env(name), _drain_env(drain_s)],
                "resources": {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"cpu": "4", "memory": "16Gi"}},
                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            }],
            # The head only downloads tokenizers and configs: a scratch volume is enough.
            "volumes": [{"name": "data", "emptyDir": {}}],
        }},
    }


def _worker_group(
    name: str, image: str, instance: InstanceType, min_workers: int, max_workers: int, drain_s: int
) -> dict[str, Any]:
    cpu, memory = int(instance.vcpus * HOST_SHARE), int(instance.memory_gib * HOST_SHARE)
    return {
        "groupName": instance.name.replace(".", "-"),
        "replicas": min_workers,
        "minReplicas": min_workers,
        "maxReplicas": max_workers,
        "rayStartParams": {
            "resources": json.dumps(json.dumps({"neuron_cores": instance.cores})),
            "metrics-export-port": str(METRICS_PORT),
        },
        "template": {"metadata": _pod_labels(name), "spec": {
            "nodeSelector": {"node.kubernetes.io/instance-type": instance.name},
            "tolerations": [{"key": "aws.amazon.com/neuron", "operator": "Exists", "effect": "NoSchedule"}],
            "terminationGracePeriodSeconds": drain_s + TEARDOWN_S,
            "containers": [{
                "name": "ray-worker",
                "image": image,
                "ports": [{"containerPort": METRICS_PORT, "name": "metrics"}],
                "env": [_hf_token_env(name), _drain_env(drain_s)],
                "resources": {
                    "requests": {"cpu": str(cpu), "memory": f"{memory}Gi"},
                    "limits": {"cpu": str(cpu), "memory": f"{memory}Gi", "aws.amazon.com/neuron": str(instance.devices)},
                },
                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            }],
            "volumes": [{"name": "data", "hostPath": {"path": f"/opt/{name}/data", "type": "DirectoryOrCreate"}}],
        }},
    }


def render_rayservice(
    serve_config: dict[str, Any],
    *,
    image: str,
    instance_type: str,
    min_workers: int,
    max_workers: int,
    name: str = "neuron-serve",
) -> dict[str, Any]:
    """The RayService for `serve_config` on a worker group of `instance_type` nodes, as a dict."""
    instance = instances.lookup(instance_type)
    if min_workers < 0 or max_workers < max(1, min_workers):
        raise ValueError(f"workers: need 0 <= min ({min_workers}) <= max ({max_workers}) and max >= 1")
    serve_text = yaml.safe_dump(
        cluster_serve_config(serve_config, instance, min_workers, max_workers), sort_keys=False, width=4096
    )
    drain_s = pod_drain_s(serve_config)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name},
        "spec": {
            "serveConfigV2": serve_text,
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 600},
                "headGroupSpec": _head_group(name, image, drain_s),
                "workerGroupSpecs": [_worker_group(name, image, instance, min_workers, max_workers, drain_s)],
            },
        },
    }


def render_podmonitor(name: str = "neuron-serve") -> dict[str, Any]:
    """A Prometheus Operator PodMonitor scraping Ray's metrics port on every pod of the RayService."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": name, "labels": {"release": "prometheus"}},
        "spec": {
            "selector": {"matchLabels": {POD_LABEL: name}},
            "podMetricsEndpoints": [{
                "port": "metrics",
                "relabelings": [{"sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"],
                                 "targetLabel": "ray_io_cluster"}],
            }],
        },
    }


PODMONITOR_HEADER = """\
# Prometheus for neuron-serve on KubeRay. GENERATED by scripts/render_kuberay.py, with rayservice.yaml.
# A Prometheus Operator PodMonitor (kube-prometheus-stack): scrape Ray's metrics port (8080) on every
# pod of the RayService, head and inf2 workers, where each batcher replica's `ray_tgi_*` and
# `ray_neuron_serve_*` series are (deployments/grafana/neuron-serve.json plots them). Apply it in the
# RayService's namespace, where the PodMonitor CRD is installed; `release` must be the label your
# Prometheus selects PodMonitors by (kube-prometheus-stack: its Helm release name).
"""


def _header(manifest: dict[str, Any]) -> str:
    worker = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    instance = INSTANCE_TYPES[worker["template"]["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"]]
    serve = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    group, _ = _cores_and_batch(serve["applications"][0]["args"])
    name = manifest["metadata"]["name"]
    drain_s = pod_drain_s(serve)
    return f"""\
# neuron-serve on EKS with KubeRay. GENERATED by scripts/render_kuberay.py from serve_config.yaml:
# edit serve_config.yaml (or use scripts/plan.py), then re-render; `--check` tells when this is stale.
#
# serveConfigV2 is serve_config.yaml with, for the cluster, `backend: neuron` (the builder may run
# before an inf2 worker joins) and, when it sets no replica count, Serve autoscaling between the
# worker group's bounds, so the Ray autoscaler adds inf2 nodes as Serve asks for more replicas.
#
# Neuron resources: each worker pod takes a whole {instance.name} node, all its {instance.devices} Neuron
# devices (`aws.amazon.com/neuron`, counted by the Neuron device plugin) = {instance.cores} NeuronCores. KubeRay
# maps `aws.amazon.com/neuroncore` to Ray's `neuron_cores` but not devices, so the cores are declared in
# rayStartParams.resources; the Ray autoscaler also reads them from there to scale this group.
# cores_per_replica {group} -> {instance.cores // group} NeuronBatcher replicas per node. Whole nodes need no Neuron
# scheduler extension. The image puts /opt/aws/neuron/bin (neuron-ls) on PATH, so Ray sees the same cores.
#
# /data (HF_HOME, compiled models): a hostPath on each inf2 node, so a restarted pod does not recompile;
# give the nodes a large root volume, or replace it with a ReadWriteMany PVC (EFS/FSx) shared by all nodes.
# HF_TOKEN comes from the Secret `{name}-hf-token` (key `{HF_TOKEN_KEY}`); it is optional for public models.
#
# A pod Kubernetes stops (kubectl drain, a spot reclaim, a scale-down, an upgrade) drains its Ray node
# first, for up to RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S = {drain_s} s: Serve moves its replicas away,
# each finishing its streams within `graceful_shutdown_timeout_s`, and drains its HTTP proxy;
# terminationGracePeriodSeconds = {drain_s + TEARDOWN_S} s leaves Ray time to stop after that.
#
# Nothing here is public: KubeRay's head and serve Services are ClusterIP, and there is no LoadBalancer,
# NodePort or Ingress. The Ray dashboard (8265) and Ray's metrics port (8080) must stay inside the cluster
# (kubectl port-forward). Before publishing the TGI API (serve service, port 8000), set `api_key`
# (API_KEY); as in TGI it leaves /health, /info, /metrics, /v1/models, /chat_tokenize and /docs open,
# so set `api_key_open_paths: [/health, /ping]` too if those must not be public.
"""


class _Literal(str):
    """A string YAML writes as a `|` block, so serveConfigV2 reads as the YAML it is."""


class _ManifestDumper(yaml.SafeDumper):
    pass


_ManifestDumper.add_representer(
    _Literal, lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|")
)


def manifest_text(manifest: dict[str, Any]) -> str:
    """The manifest as committed: the explanatory header, then the YAML."""
    body = copy.deepcopy(manifest)
    body["spec"]["serveConfigV2"] = _Literal(body["spec"]["serveConfigV2"])
    return _header(manifest) + yaml.dump(body, Dumper=_ManifestDumper, sort_keys=False, width=4096)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve-config", type=Path, default=SERVE_CONFIG)
    parser.add_argument("--out", type=Path, default=MANIFEST)
    parser.add_argument("--image", default=DEFAULT_IMAGE)
    parser.add_argument("--instance-type", default=DEFAULT_INSTANCE_TYPE, choices=sorted(INSTANCE_TYPES))
    parser.add_argument("--min-workers", type=int, default=DEFAULT_MIN_WORKERS)
    parser.add_argument("--max-workers", type=int, default=DEFAULT_MAX_WORKERS)
    parser.add_argument("--name", default="neuron-serve", help="RayService name")
    parser.add_argument("--check", action="store_true", help="exit 1 if --out is not what would be rendered")
    args = parser.parse_args(argv)

    serve_config = yaml.safe_load(args.serve_config.read_text())
    try:
        manifest = render_rayservice(serve_config, image=args.image, instance_type=args.instance_type,
                                     min_workers=args.min_workers, max_workers=args.max_workers, name=args.name)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    outputs = {
        args.out: manifest_text(manifest),
        args.out.with_name(PODMONITOR.name): PODMONITOR_HEADER + yaml.dump(render_podmonitor(args.name), sort_keys=False),
    }
    if args.check:
        stale = [path for path, text in outputs.items() if not path.is_file() or path.read_text() != text]
        for path in stale:
            print(f"{path} is out of date: run scripts/render_kuberay.py", file=sys.stderr)
        if not stale:
            print(f"{', '.join(map(str, outputs))} are up to date")
        return 1 if stale else 0
    for path, text in outputs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
