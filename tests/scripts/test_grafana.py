"""deployments/grafana/neuron-serve.json: a dashboard Grafana imports, plotting only series metrics.py records.

The declared names come from metrics.py's source (no Ray needed) and are mapped to what Ray's
Prometheus export calls them: `ray_<name>`, counters with `_total` (Ray's OpenTelemetry exporter,
the default, writes them as Prometheus counters), histograms as `_bucket`, `_sum` and `_count`, and
a `TgiHistogram` also as its exact-sum counter, `<name>_exact_sum_total`.
Renaming a metric without updating the dashboard fails here.
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_PATH = ROOT / "deployments" / "grafana" / "neuron-serve.json"
METRICS_PATH = ROOT / "deployments" / "metrics.py"
METRIC_KINDS = {"Counter", "Gauge", "Histogram", "TgiHistogram"}
SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{")  # a metric name with its label matchers
RAY_NAME = re.compile(r"\bray_[A-Za-z0-9_:]+")


def declared_metrics() -> dict[str, str]:
    """{name: kind} for every Counter/Gauge/Histogram metrics.py creates, through helper lambdas too."""
    tree = ast.parse(METRICS_PATH.read_text())

    def kind_of(call: ast.AST) -> str | None:
        if isinstance(call, ast.Call):
            func = call.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            return name if name in METRIC_KINDS else factories.get(name)
        return None

    factories: dict[str, str] = {}  # e.g. `d = lambda name, text: Histogram(name, ...)`
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Lambda) and kind_of(node.value.body):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    factories[target.id] = kind_of(node.value.body)
    declared = {}
    for node in ast.walk(tree):
        kind = kind_of(node)
        if kind and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            declared[node.args[0].value] = kind
    return declared


def exported_names(declared: dict[str, str]) -> set[str]:
    histogram = ["_bucket", "_sum", "_count"]
    suffixes = {"Counter": ["_total"], "Gauge": [""], "Histogram": histogram,
                "TgiHistogram": histogram + ["_exact_sum_total"]}
    return {f"ray_{name}{suffix}" for name, kind in declared.items() for suffix in suffixes[kind]}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD_PATH.read_text())


def graph_panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def queries(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in graph_panels(dashboard) for t in p["targets"]]
    variables = [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs + variables


def metric_names(query: str) -> set[str]:
    return set(SELECTOR.findall(query)) | set(RAY_NAME.findall(query))


def test_declared_names_are_found():
    declared = declared_metrics()
    assert declared["tgi_request_failure"] == "Counter"
    assert declared["tgi_queue_size"] == "Gauge"
    assert declared["tgi_request_duration"] == "TgiHistogram"  # made through the `d` helper
    assert declared["neuron_serve_time_to_first_token"] == declared["neuron_serve_inter_token_latency"] == "Histogram"
    assert all(name.startswith(("tgi_", "neuron_serve_")) for name in declared), sorted(declared)


def test_dashboard_only_series_stay_off_tgi_metrics_page():
    from deployments.metrics import tgi_metrics_text

    # A Ray metrics page as its OpenTelemetry exporter writes it (counters get `_total`).
    page = """# HELP ray_tgi_request_success_total Requests that generated successfully
# TYPE ray_tgi_request_success_total counter
ray_tgi_request_success_total{application="default",replica="r1"} 2.0
# HELP ray_neuron_serve_time_to_first_token From the request reaching the replica to its first token (s)
# TYPE ray_neuron_serve_time_to_first_token histogram
ray_neuron_serve_time_to_first_token_bucket{application="default",cores="0,1",le="0.1"} 1.0
ray_neuron_serve_time_to_first_token_bucket{application="default",cores="0,1",le="+Inf"} 1.0
ray_neuron_serve_time_to_first_token_count{application="default",cores="0,1"} 1.0
ray_neuron_serve_time_to_first_token_sum{application="default",cores="0,1"} 0.05
"""
    text = tgi_metrics_text([page], application="default")
    assert "tgi_request_success 2" in text.splitlines()
    assert "neuron_serve" not in text


def test_tgi_metrics_page_takes_histogram_sums_from_their_exact_counters():
    """Ray's `_sum` is rebuilt from bucket midpoints (here 5.12 x 3 + 97.28 for 10, 10, 10 and 100 tokens);
    the page prints the exact counter's total instead, summed over replicas, and bounds as TGI writes them."""
    from deployments.metrics import tgi_metrics_text

    page = """# HELP ray_tgi_request_generated_tokens Generated tokens
# TYPE ray_tgi_request_generated_tokens histogram
ray_tgi_request_generated_tokens_bucket{application="default",replica="r1",le="10.24"} 3.0
ray_tgi_request_generated_tokens_bucket{application="default",replica="r1",le="102.4"} 4.0
ray_tgi_request_generated_tokens_bucket{application="default",replica="r1",le="+Inf"} 4.0
ray_tgi_request_generated_tokens_count{application="default",replica="r1"} 4.0
ray_tgi_request_generated_tokens_sum{application="default",replica="r1"} 112.64
ray_tgi_request_generated_tokens_bucket{application="default",replica="r2",le="10.24"} 1.0
ray_tgi_request_generated_tokens_bucket{application="default",replica="r2",le="102.4"} 1.0
ray_tgi_request_generated_tokens_bucket{application="default",replica="r2",le="+Inf"} 1.0
ray_tgi_request_generated_tokens_count{application="default",replica="r2"} 1.0
ray_tgi_request_generated_tokens_sum{application="default",replica="r2"} 5.12
# HELP ray_tgi_request_generated_tokens_exact_sum_total Generated tokens: the sum of the values
# TYPE ray_tgi_request_generated_tokens_exact_sum_total counter
ray_tgi_request_generated_tokens_exact_sum_total{application="default",replica="r1"} 130.0
ray_tgi_request_generated_tokens_exact_sum_total{application="default",replica="r2"} 7.0
# HELP ray_tgi_batch_next_size New requests a prefill took in
# TYPE ray_tgi_batch_next_size histogram
ray_tgi_batch_next_size_bucket{application="default",replica="r1",le="1.0"} 0.0
ray_tgi_batch_next_size_bucket{application="default",replica="r1",le="+Inf"} 0.0
ray_tgi_batch_next_size_count{application="default",replica="r1"} 0.0
ray_tgi_batch_next_size_sum{application="default",replica="r1"} 0.0
"""
    lines = tgi_metrics_text([page], application="default").splitlines()
    assert "tgi_request_generated_tokens_sum 137" in lines
    assert "tgi_request_generated_tokens_count 5" in lines
    assert 'tgi_request_generated_tokens_bucket{le="10.24"} 4' in lines
    assert 'tgi_batch_next_size_bucket{le="1"} 0' in lines  # Rust writes 1.0 as `1`
    assert "tgi_batch_next_size_sum 0" in lines
    assert not [line for line in lines if "exact" in line]


def test_duration_buckets_are_tgis_to_the_last_bit():
    """`router/src/server.rs`: `value = 0.0001`, then `value *= 1.5` 35 times; TGI's page shows each
    in Rust's shortest form, which is Python's repr."""
    from deployments.metrics import DURATION_BUCKETS, _le

    assert len(DURATION_BUCKETS) == 35
    assert [_le(repr(b)) for b in DURATION_BUCKETS[:3]] == ["0.00015000000000000001", "0.00022500000000000002", "0.0003375"]
    assert _le(repr(DURATION_BUCKETS[-1])) == "145.61096060497135"


def test_dashboard_shape(dashboard):
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("application", "cores"):
        assert variables[name]["type"] == "query" and variables[name]["definition"].startswith("label_values(")
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), Counter(ids)
    for panel in graph_panels(dashboard):
        assert panel["title"] and set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
            assert target["datasource"]["uid"] == "${datasource}"


def test_every_queried_metric_is_declared_in_metrics_py(dashboard):
    exported = exported_names(declared_metrics())
    for query in queries(dashboard):
        names = metric_names(query)
        assert names, query
        unknown = names - exported
        assert not unknown, f"{query!r} reads {sorted(unknown)}, which deployments/metrics.py does not record"


def test_selectors_filter_on_the_template_variables(dashboard):
    for panel in graph_panels(dashboard):
        for target in panel["targets"]:
            assert 'application=~"$application"' in target["expr"], target["expr"]
            if "by (cores" in target["expr"] or "by (le, cores" in target["expr"]:
                assert 'cores=~"$cores"' in target["expr"], target["expr"]


@pytest.mark.parametrize("topic, metric", [
    ("throughput", "ray_tgi_request_generated_tokens_exact_sum_total"),
    ("occupancy", "ray_tgi_batch_current_max_tokens"),
    ("first token", "ray_neuron_serve_time_to_first_token_bucket"),
    ("inter-token", "ray_neuron_serve_inter_token_latency_bucket"),
    ("queue", "ray_tgi_queue_size"),
    ("errors", "ray_tgi_request_failure_total"),
    ("forward duration", "ray_tgi_batch_forward_duration_bucket"),
    ("request duration", "ray_tgi_request_duration_bucket"),
])
def test_panels_cover(dashboard, topic, metric):
    [panel] = [p for p in graph_panels(dashboard) if topic in p["title"].lower()]
    assert any(metric in metric_names(t["expr"]) for t in panel["targets"]), (topic, panel["targets"])
