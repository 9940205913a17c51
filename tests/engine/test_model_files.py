"""Where a model's files come from: what a hub download fetches, and whose tokenizer a compiled model uses."""

from __future__ import annotations

import json

import huggingface_hub
import pytest
import transformers

from neuron_serve.config import Config
from neuron_serve.model_files import load_tokenizer, resolve_model_dir


@pytest.fixture
def downloads(monkeypatch, tmp_path):
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append({"repo_id": repo_id, **kwargs})
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_a_hub_model_is_fetched_without_the_weights_nothing_here_reads(downloads):
    """Llama 3's repositories hold Meta's original weights too (`original/*.pth`, 16 GB for 8B)."""
    config = Config(model_id="org/model", revision="abc", hf_token="hf_gated")
    resolve_model_dir(config)
    resolve_model_dir(config, weights=False)
    whole, files_only = downloads
    assert whole["repo_id"] == "org/model" and whole["revision"] == "abc" and whole["token"] == "hf_gated"
    assert whole["allow_patterns"] is None and {"original/*", "*.pth"} <= set(whole["ignore_patterns"])
    assert "*.json" in files_only["allow_patterns"] and "*.safetensors" not in files_only["allow_patterns"]


def test_a_compiled_model_without_a_tokenizer_takes_its_checkpoints_with_the_token(monkeypatch, tmp_path, tokenizer):
    (tmp_path / "neuron_config.json").write_text(json.dumps({"checkpoint_id": "org/gated", "checkpoint_revision": "r1"}))
    asked = []

    def from_pretrained(source, **kwargs):
        asked.append({"source": source, **kwargs})
        return tokenizer

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    assert load_tokenizer(tmp_path, "hf_gated") is tokenizer
    assert asked == [{"source": "org/gated", "token": "hf_gated", "revision": "r1"}]
