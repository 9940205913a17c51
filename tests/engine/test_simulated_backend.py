"""The simulated backend: inf2 step times from published figures, deterministic tokens, through the engine."""

from __future__ import annotations

import pytest

from neuron_serve.backends.simulated import Inf2Timing, SimulatedBackend, count_parameters
from neuron_serve.config import Config
from neuron_serve.loading import build_engine

from .helpers import request, run, token_ids

LLAMA3_8B = 8.03e9


def test_timing_reproduces_the_published_figures_it_was_fitted_to():
    on_8_cores = Inf2Timing(LLAMA3_8B, cores=8)
    for batch, tok_s in [(1, 83), (8, 333), (32, 505)]:
        assert batch / on_8_cores.decode_s(batch) == pytest.approx(tok_s, rel=0.15), batch
    on_2_cores = Inf2Timing(LLAMA3_8B, cores=2)
    assert on_2_cores.decode_s(2) == pytest.approx(0.053, rel=0.15)  # vLLM on inf2.8xlarge, TP 2: ITL 53 ms
    assert 32 * on_8_cores.prefill_s(2048) == pytest.approx(8.3, rel=0.25)  # 32 long prompts ≈ 8.3 s


def test_tiny_model_parameter_count(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    assert count_parameters(tiny_model_dir) == sum(p.numel() for p in model.parameters())


def test_tokens_are_deterministic_whatever_the_batch_and_steps_cost_the_modelled_time(tiny_model_dir, tokenizer):
    slept = []
    config = Config(model_id=str(tiny_model_dir), backend="simulated", max_batch_size=4, max_total_tokens=256,
                    simulated_params=LLAMA3_8B, cores_per_replica=2)
    engine = build_engine(config)
    engine.backend.sleep = slept.append
    prompt = tokenizer("Hello").input_ids
    alone = token_ids(run(engine, {0: [request("a", prompt, 20)]})["a"])
    busy = run(engine, {0: [request("b", prompt, 30), request("c", tokenizer("Other").input_ids, 25)],
                        3: [request("a", prompt, 20)]})
    assert token_ids(busy["a"]) == alone and engine.backend.description.startswith("simulated inf2, 8.0B params on 2 cores")
    timing = Inf2Timing(LLAMA3_8B, 2)
    assert slept.count(timing.decode_s(4)) >= 19  # every decode step costs a full static batch
    assert not set(alone) & (set(tokenizer.all_special_ids) | {1, 3})  # never special, never EOS


def test_simulated_backend_alone():
    backend = SimulatedBackend(2, 64, 100, Inf2Timing(1e9, 2), sleep=lambda s: None)
    first = backend.prefill([0, 1], [[5, 6], [5, 6]]).logits.argmax(-1).tolist()
    assert first[0] == first[1]
    assert backend.decode([1], [first[1]], [2]).argmax(-1).tolist() == backend.decode([0], [first[0]], [2]).argmax(-1).tolist()
