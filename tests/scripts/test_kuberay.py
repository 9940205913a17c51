"""deployments/kuberay/rayservice.yaml: rendered from serve_config.yaml, valid for Ray, sized for inf2, nothing public."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
render_kuberay = importlib.import_module("render_kuberay")

from neuron_serve.config import load_config  # noqa: E402
from neuron_serve.instances import lookup  # noqa: E402

from ..conftest import SERVE_CONFIG  # noqa: E402

MANIFEST_PATH = ROOT / "deployments" / "kuberay" / "rayservice.yaml"


def render(serve_config: dict = SERVE_CONFIG, **options) -> dict:
    defaults = dict(image=render_kuberay.DEFAULT_IMAGE, instance_type=render_kuberay.DEFAULT_INSTANCE_TYPE,
                    min_workers=render_kuberay.DEFAULT_MIN_WORKERS, max_workers=render_kuberay.DEFAULT_MAX_WORKERS)
    return render_kuberay.render_rayservice(serve_config, **{**defaults, **options})


@pytest.fixture(scope="module")
def manifest() -> dict:
    return yaml.safe_load(MANIFEST_PATH.read_text())


def groups(manifest: dict) -> tuple[dict, dict]:
    cluster = manifest["spec"]["rayClusterConfig"]
    [worker] = cluster["workerGroupSpecs"]
    return cluster["headGroupSpec"], worker


def test_the_committed_manifest_is_what_serve_config_yaml_renders(manifest, capsys):
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    assert manifest == render()
    assert render_kuberay.main(["--check"]) == 0


def test_the_podmonitor_scrapes_ray_metrics_on_every_pod_of_the_rayservice(manifest):
    monitor = yaml.safe_load((ROOT / "deployments" / "kuberay" / "podmonitor.yaml").read_text())
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    assert monitor == render_kuberay.render_podmonitor(manifest["metadata"]["name"])
    selector = monitor["spec"]["selector"]["matchLabels"]
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    for group in groups(manifest):
        template = group["template"]
        assert selector.items() <= template["metadata"]["labels"].items()
        [container] = template["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports[endpoint["port"]] == int(group["rayStartParams"]["metrics-export-port"])


def test_check_fails_on_a_stale_manifest(tmp_path, capsys):
    stale = tmp_path / "rayservice.yaml"
    stale.write_text(MANIFEST_PATH.read_text().replace("max_batch_size: 8", "max_batch_size: 16"))
    assert render_kuberay.main(["--check", "--out", str(stale)]) == 1
    assert "out of date" in capsys.readouterr().err


def test_serve_config_v2_is_valid_for_ray_and_is_the_root_config_for_the_cluster(manifest):
    from ray.serve.schema import ServeDeploySchema

    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    assert {k: v for k, v in embedded.items() if k != "applications"} == \
        {k: v for k, v in SERVE_CONFIG.items() if k != "applications"}
    [app], [root_app] = embedded["applications"], SERVE_CONFIG["applications"]
    assert {k: v for k, v in app.items() if k != "args"} == {k: v for k, v in root_app.items() if k != "args"}
    args = dict(app["args"])
    assert args.pop("backend") == "neuron"  # the only changes: backend, and autoscaling within the worker bounds
    autoscaling = args.pop("autoscaling_config")
    assert args == {k: v for k, v in root_app["args"].items() if k != "backend"}
    assert load_config(app["args"], environ={}).backend == "neuron"

    _, worker = groups(manifest)
    per_node = lookup("inf2.48xlarge").cores // app["args"]["cores_per_replica"]
    assert per_node == 12
    assert autoscaling["min_replicas"] == per_node * worker["minReplicas"]
    assert autoscaling["max_replicas"] == per_node * worker["maxReplicas"]


def test_the_worker_group_takes_whole_inf2_nodes_and_declares_their_cores(manifest):
    _, worker = groups(manifest)
    spec = worker["template"]["spec"]
    instance = lookup(spec["nodeSelector"]["node.kubernetes.io/instance-type"])
    assert instance.name == "inf2.48xlarge"
    assert {"key": "aws.amazon.com/neuron", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    [container] = spec["containers"]
    assert container["resources"]["limits"]["aws.amazon.com/neuron"] == str(instance.devices) == "12"
    declared = json.loads(json.loads(worker["rayStartParams"]["resources"]))  # KubeRay wants an escaped JSON string
    assert declared == {"neuron_cores": instance.cores} == {"neuron_cores": 24}
    cores_per_replica = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"][0]["args"]["cores_per_replica"]
    assert declared["neuron_cores"] % cores_per_replica == 0
    assert manifest["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    assert 0 <= worker["minReplicas"] <= worker["replicas"] <= worker["maxReplicas"]


def test_the_head_runs_no_replicas(manifest):
    head, _ = groups(manifest)
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "aws.amazon.com/neuron" not in json.dumps(head)


def test_hf_token_comes_from_a_secret_and_data_is_a_volume(manifest):
    for group in groups(manifest):
        spec = group["template"]["spec"]
        [container] = spec["containers"]
        [token] = [e for e in container["env"] if e["name"] == "HF_TOKEN"]
        assert set(token) == {"name", "valueFrom"} and token["valueFrom"]["secretKeyRef"]["key"]
        [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == "/data"]
        assert any(v["name"] == mount["name"] for v in spec["volumes"])
    _, worker = groups(manifest)
    [data] = [v for v in worker["template"]["spec"]["volumes"] if v["name"] == "data"]
    assert data["hostPath"]["path"]  # survives pod restarts on the node, so compiled models are reused


def test_nothing_is_exposed_outside_the_cluster(manifest):
    head, _ = groups(manifest)
    assert head["serviceType"] == "ClusterIP"
    for path in MANIFEST_PATH.parent.glob("*.y*ml"):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc.get("kind") not in ("Ingress", "Gateway")
            assert doc.get("kind") != "Service" or doc.get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    text = MANIFEST_PATH.read_text()
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    assert "LoadBalancer" not in body and "NodePort" not in body


def drain_settings(manifest: dict) -> list[tuple[float, int]]:
    """(RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S, terminationGracePeriodSeconds) of each group's pods."""
    settings = []
    for group in groups(manifest):
        spec = group["template"]["spec"]
        [container] = spec["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        settings.append((float(env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"]), spec["terminationGracePeriodSeconds"]))
    return settings


def test_a_stopping_pod_drains_its_node_for_longer_than_serve_needs(manifest):
    """`ray start` drains its node on SIGTERM (tests/reliability/test_pod_stop.py) for the time the pod sets:
    longer than the replicas' graceful timeout and Serve's minimum for a draining proxy, and Kubernetes
    waits longer still. Ray's default (30 s) is shorter than both."""
    from ray.serve._private.constants import PROXY_MIN_DRAINING_PERIOD_S

    assert render_kuberay.PROXY_DRAIN_S == PROXY_MIN_DRAINING_PERIOD_S  # our copy of Ray's figure is Ray's
    [app] = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"]
    graceful = load_config(app["args"], environ={}).graceful_shutdown_timeout_s
    for drain, grace in drain_settings(manifest):
        assert drain >= max(graceful, PROXY_MIN_DRAINING_PERIOD_S) + 10
        assert grace >= drain + 10

    longer = yaml.safe_load(yaml.safe_dump(SERVE_CONFIG))
    longer["applications"][0]["args"]["graceful_shutdown_timeout_s"] = 300  # long generations
    for drain, grace in drain_settings(render(longer)):
        assert drain >= 310 and grace >= drain + 10


def test_other_instance_types_and_bad_groups():
    manifest = render(instance_type="inf2.24xlarge", min_workers=0, max_workers=2)
    _, worker = groups(manifest)
    assert worker["template"]["spec"]["containers"][0]["resources"]["limits"]["aws.amazon.com/neuron"] == "6"
    assert json.loads(json.loads(worker["rayStartParams"]["resources"])) == {"neuron_cores": 12}
    autoscaling = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"][0]["args"]["autoscaling_config"]
    assert (autoscaling["min_replicas"], autoscaling["max_replicas"]) == (0, 12)

    bad = yaml.safe_load(yaml.safe_dump(SERVE_CONFIG))
    bad["applications"][0]["args"]["cores_per_replica"] = 5
    with pytest.raises(ValueError, match=r"`cores_per_replica` \(5\) must divide the 24 NeuronCores of inf2.48xlarge"):
        render(bad)
    with pytest.raises(ValueError, match="unknown instance type 'inf3.xlarge'"):
        render(instance_type="inf3.xlarge")
