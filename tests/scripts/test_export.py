"""scripts/export.py: refuses clearly off-Neuron; on a (stand-in) Neuron host writes a servable directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.engine.neuron_standin import NeuronModelStandIn

from ..conftest import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "export.py"


def test_export_refuses_clearly_without_the_neuron_sdk(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "some/model", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "cannot compile here: the neuron backend needs the AWS Neuron SDK" in out.stderr
    assert not (tmp_path / "x").exists()


def test_export_writes_a_compiled_model_with_its_tokenizer(tiny_model_dir, tmp_path, capsys):
    out_dir = tmp_path / "compiled"
    code = load_script("export").main([str(tiny_model_dir), "--batch-size", "4", "--sequence-length", "256", "--num-cores", "2",
                               "--dtype", "float32", "--out", str(out_dir)], model_class=NeuronModelStandIn)
    assert code == 0
    nc = json.loads((out_dir / "neuron_config.json").read_text())
    assert (nc["batch_size"], nc["sequence_length"], nc["tp_degree"]) == (4, 256, 2)
    assert (out_dir / "tokenizer.json").is_file() and (out_dir / "generation_config.json").is_file()
    printed = capsys.readouterr().out
    assert "batch_size             4" in printed and f"model_id: {out_dir}" in printed and "cores_per_replica: 2" in printed
