"""The built-in model: the same bytes every time, and stock transformers loads it."""

from __future__ import annotations

import filecmp

from neuron_serve.tiny_model import build_tiny_model, ensure_tiny_model, main


def test_deterministic_bytes(tmp_path):
    a, b = build_tiny_model(tmp_path / "a"), build_tiny_model(tmp_path / "b")
    names = sorted(p.name for p in a.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert mismatch == [] and errors == []


def test_loads_with_stock_transformers(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "llama"
    assert 4e6 < sum(p.numel() for p in model.parameters()) < 10e6
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|begin_of_text|><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer("Hello 🚀 世界", return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == "Hello 🚀 世界"
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=1)
    assert out.shape[1] == ids.shape[1] + 3 or out[0, -1].item() in model.generation_config.eos_token_id


def test_cache_is_reused_and_command_writes_a_model(tmp_path, capsys):
    first = ensure_tiny_model(tmp_path / "cache")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(tmp_path / "cache") == first and (first / "model.safetensors").stat().st_mtime_ns == stamp
    main([str(tmp_path / "out")])
    assert (tmp_path / "out" / "model.safetensors").is_file() and "wrote" in capsys.readouterr().out
