"""Fixtures shared by every test: the built-in tiny model, its transformers reference, engines in one line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from neuron_serve.tiny_model import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from neuron_serve.model_files import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="session")
def hf_model(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def reference(hf_model):
    """Greedy tokens from transformers' own `generate`, memoized: reference(input_ids, n) -> list[int]."""
    import torch

    cache: dict = {}

    def generate(input_ids, max_new_tokens: int, **kwargs) -> list[int]:
        key = (tuple(input_ids), max_new_tokens, tuple(sorted(kwargs.items())))
        if key not in cache:
            ids = torch.tensor([list(input_ids)])
            with torch.inference_mode():
                out = hf_model.generate(
                    ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                    pad_token_id=hf_model.generation_config.eos_token_id[0], **kwargs,
                )
            cache[key] = out[0, ids.shape[1]:].tolist()
        return cache[key]

    return generate
