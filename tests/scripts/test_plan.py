"""scripts/plan.py: parameter counts, head sharding, core groups and batch sizes on known configs, and its files."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))  # plan.py imports render_kuberay as its neighbour, as when run as a script
plan = importlib.import_module("plan")

from neuron_serve.config import load_config  # noqa: E402
from neuron_serve.instances import lookup  # noqa: E402

GIB = 2**30
LLAMA3_8B = {
    "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256, "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
}
LLAMA3_70B = {
    **LLAMA3_8B, "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64, "intermediate_size": 28672,
}


def write_config(tmp_path: Path, config: dict, name: str = "model") -> Path:
    model_dir = tmp_path / name
    model_dir.mkdir()
    path = model_dir / "config.json"
    path.write_text(json.dumps(config))
    return path


def run_plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / "plan.py"), *args], capture_output=True, text=True, timeout=120)


def make_plan(config: dict, instance: str, sequence_length: int = 4096, batch_size: int | None = None):
    shape = plan.ModelShape.from_config(config, name="m")
    return plan.plan(shape, "m", lookup(instance), sequence_length=sequence_length, batch_size=batch_size)


def test_parameter_counts_match_the_published_sizes():
    assert plan.ModelShape.from_config(LLAMA3_8B, "8b").parameters() == 8_030_261_248  # "8.03B"
    assert plan.ModelShape.from_config(LLAMA3_70B, "70b").parameters() == 70_553_706_496  # "70.6B"
    tied = plan.ModelShape.from_config({**LLAMA3_8B, "tie_word_embeddings": True}, "tied")
    assert tied.parameters() == 8_030_261_248 - 128256 * 4096


# Llama 4's text configs (Scout; Maverick has 128 experts, a MoE layer every second one)
LLAMA4_SCOUT = {"model_type": "llama4_text", "hidden_size": 5120, "num_hidden_layers": 48, "num_attention_heads": 40,
                "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
                "num_local_experts": 16, "interleave_moe_layer_step": 1, "vocab_size": 202048}


def test_llama4_counts_its_shared_expert_and_its_dense_layers():
    """Published: Scout 109B, Maverick 400B, with their vision encoders (under 1B); the LM here."""
    scout = plan.ModelShape.from_config(LLAMA4_SCOUT, "scout").parameters()
    maverick = plan.ModelShape.from_config({**LLAMA4_SCOUT, "num_local_experts": 128, "interleave_moe_layer_step": 2},
                                           "maverick").parameters()
    assert 107e9 < scout < 109e9 and 400e9 < maverick < 401e9


@pytest.mark.parametrize("tp, heads, kv, expected", [
    (2, 32, 8, (32, 8, "split")),  # 4 KV heads per core
    (8, 32, 8, (32, 8, "split")),
    (16, 32, 8, (32, 16, "replicated")),  # each KV head on two cores
    (24, 32, 8, (48, 24, "padded")),  # 32 query heads padded to 48; KV replicated to 24
    (24, 64, 8, (72, 24, "padded")),
    (4, 32, 32, (32, 32, "split")),  # multi-head attention
    (4, 28, 6, (28, 28, "padded")),  # 4 neither divides nor is divided by 6: KV converted to one per query head
])
def test_heads_are_sharded_as_optimum_neuron_does(tp, heads, kv, expected):
    s = plan.shard_heads(tp, heads, kv)
    assert (s.heads, s.kv_heads, s.kind) == expected


def test_llama3_8b_on_inf2_48xlarge_takes_two_cores_per_replica():
    p = make_plan(LLAMA3_8B, "inf2.48xlarge")
    by_tp = {c.tp: c for c in p.candidates}
    assert sorted(by_tp) == [1, 2, 4, 6, 8, 12, 24]  # 16 and 32 do not divide 24 cores
    # ~15 GiB of bf16 weights cannot fit one 16 GiB core beside the runtime; two cores hold them.
    assert by_tp[1].weights_per_core > 14 * GIB and by_tp[1].max_batch == 0
    assert p.chosen.tp == 2 and p.chosen.replicas == 12
    assert by_tp[2].kv_per_sequence_per_core == 2 * 32 * 4 * 128 * 4096 * 2  # 4 of the 8 KV heads per core
    assert p.batch_size == p.chosen.max_batch == 26
    assert p.chosen.memory_per_core(26) <= p.chosen.budget_per_core < p.chosen.memory_per_core(27)


def test_a_given_batch_size_is_checked_and_may_need_a_bigger_group():
    p = make_plan(LLAMA3_8B, "inf2.48xlarge", batch_size=32)
    assert (p.chosen.tp, p.chosen.replicas, p.batch_size) == (4, 6, 32)
    assert make_plan(LLAMA3_8B, "inf2.xlarge").chosen.replicas == 1


def test_70b_falls_back_to_a_padded_group_of_12_cores_on_inf2_48xlarge():
    p = make_plan(LLAMA3_70B, "inf2.48xlarge")
    assert (p.chosen.tp, p.chosen.replicas, p.chosen.sharding.kind) == (12, 2, "padded")
    assert all(c.max_batch == 0 for c in p.candidates if c.sharding.exact)


def test_sequence_length_beyond_the_model_is_refused():
    with pytest.raises(plan.PlanError, match=r"--sequence-length \(16384\) must be <= the model's max_position_embeddings \(8192\)"):
        make_plan(LLAMA3_8B, "inf2.48xlarge", sequence_length=16384)


def test_cli_prints_its_table_and_json_and_writes_a_valid_serve_config(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    config_path = write_config(tmp_path, LLAMA3_8B, "Meta-Llama-3-8B")
    out = run_plan("--model", str(config_path), "--instance", "inf2.48xlarge", "--sequence-length", "4096",
                   "--json", "--out-dir", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert (summary["cores_per_replica"], summary["replicas"], summary["batch_size"], summary["sequence_length"]) == (2, 12, 26, 4096)
    assert summary["weights_gib"] == pytest.approx(14.96, abs=0.01) and summary["memory_gib_per_core"] <= summary["budget_gib_per_core"]
    assert any(line.split()[:3] == ["2", "32/8", "split"] for line in lines)  # the table, one row per tp

    serve_config = yaml.safe_load((tmp_path / "out" / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(serve_config)
    config = load_config(serve_config["applications"][0]["args"], environ={})
    assert config.model_id == str(config_path.parent) and config.backend == "neuron"
    assert (config.cores_per_replica, config.max_batch_size, config.max_total_tokens, config.max_input_tokens) == (2, 26, 4096, 2048)
    assert (config.export_batch_size, config.export_sequence_length, config.export_num_cores, config.export_auto_cast_type) == (26, 4096, 2, "bf16")

    manifest = yaml.safe_load((tmp_path / "out" / "rayservice.yaml").read_text())
    ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    worker = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert json.loads(json.loads(worker["rayStartParams"]["resources"])) == {"neuron_cores": 24}


def test_cli_accepts_a_model_directory_and_checks_a_batch(tmp_path):
    config_path = write_config(tmp_path, LLAMA3_8B)
    out = run_plan("--model", str(config_path.parent), "--instance", "inf2.48xlarge", "--batch-size", "32", "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert (summary["cores_per_replica"], summary["replicas"], summary["batch_size"]) == (4, 6, 32)


def test_a_model_that_cannot_fit_exits_non_zero_and_says_where_it_would(tmp_path):
    out = run_plan("--model", str(write_config(tmp_path, LLAMA3_70B)), "--instance", "inf2.xlarge", "--json")
    assert out.returncode == 2
    assert "does not fit on inf2.xlarge" in out.stderr and "131.4 GiB of bf16 weights" in out.stderr
    assert "It fits on: inf2.24xlarge (tp 12), inf2.48xlarge (tp 12)" in out.stderr
    assert out.stdout == ""


def test_a_missing_config_is_a_clear_error(tmp_path):
    out = run_plan("--model", str(tmp_path / "nope" / "config.json"), "--instance", "inf2.xlarge")
    assert out.returncode == 2 and "is not a config.json or a directory holding one" in out.stderr
