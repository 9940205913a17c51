"""Configuration: defaults ← args ← TGI env vars, and a clear message for each inconsistent setting."""

from __future__ import annotations

import pytest

from neuron_serve.config import Config, load_config, resolve_limits
from neuron_serve.errors import ConfigError
from neuron_serve.tiny_model import TINY_MODEL_ID


def test_defaults_then_args_then_env():
    assert load_config({}, environ={}).model_id == TINY_MODEL_ID
    config = load_config({"max_batch_size": 4, "model_id": "/data/a"}, environ={"MAX_BATCH_SIZE": "16"})
    assert config.max_batch_size == 16 and config.model_id == "/data/a"
    env = {"MODEL_ID": "org/model", "MAX_INPUT_LENGTH": "100", "MAX_TOTAL_TOKENS": "200", "HF_TOKEN": "hf_x",
           "MAX_BATCH_PREFILL_TOKENS": "800", "HF_NUM_CORES": "2", "HF_AUTO_CAST_TYPE": "bf16",
           "CORS_ALLOW_ORIGIN": "https://a.example, https://b.example"}
    config = load_config({}, environ=env)
    assert (config.model_id, config.max_input_tokens, config.max_total_tokens) == ("org/model", 100, 200)
    assert config.hf_token.get_secret_value() == "hf_x" and "hf_x" not in repr(config)
    assert config.export_num_cores == 2 and config.export_auto_cast_type == "bf16"
    assert config.cors_allow_origin == ["https://a.example", "https://b.example"]
    assert load_config({}, environ={"MAX_INPUT_TOKENS": "7", "MAX_INPUT_LENGTH": "9"}).max_input_tokens == 7
    assert load_config({}, environ={"COMPUTE_TYPE": "gpu+optimized"}).compute_type == "gpu+optimized"


IMAGE_ARGS = {"model_id": TINY_MODEL_ID, "cores_per_replica": 2, "max_batch_size": 8, "max_total_tokens": 1024,
              "max_input_tokens": 512}  # what serve_config.yaml gives the built-in model


def test_a_model_named_in_the_environment_comes_with_its_own_shape():
    """`docker run -e MODEL_ID=...` as with neuronx-tgi: the args' limits were the args' model's."""
    config = load_config(IMAGE_ARGS, environ={"MODEL_ID": "aws-neuron/model"})
    assert config.model_id == "aws-neuron/model"
    assert (config.max_batch_size, config.max_total_tokens, config.max_input_tokens) == (None, None, None)
    assert "cores_per_replica" not in config.model_fields_set
    config = load_config(IMAGE_ARGS, environ={"HF_MODEL_ID": "org/m", "HF_MODEL_REVISION": "v2", "MAX_BATCH_SIZE": "4"})
    assert (config.model_id, config.revision, config.max_batch_size, config.max_total_tokens) == ("org/m", "v2", 4, None)
    same = load_config(IMAGE_ARGS, environ={"MODEL_ID": TINY_MODEL_ID})
    assert (same.max_batch_size, same.max_total_tokens) == (8, 1024)
    assert load_config(IMAGE_ARGS, environ={"MAX_BATCH_SIZE": "4"}).max_total_tokens == 1024


def test_replicas_take_the_cores_a_model_was_compiled_for(tiny_model_dir, tmp_path):
    """Unless set, `cores_per_replica` is the compiled tp_degree, else HF_NUM_CORES, as neuronx-tgi sizes itself."""
    from neuron_serve.loading import settle_cores

    compiled = tmp_path / "compiled"
    compiled.mkdir()
    (compiled / "neuron_config.json").write_text('{"tp_degree": 8, "batch_size": 4, "sequence_length": 4096}')
    assert settle_cores(load_config({}, environ={}), compiled).cores_per_replica == 8
    assert settle_cores(load_config({}, environ={"HF_NUM_CORES": "4"}), tiny_model_dir).cores_per_replica == 4
    assert settle_cores(load_config({}, environ={}), tiny_model_dir).cores_per_replica == 2
    assert settle_cores(load_config({"cores_per_replica": 2}, environ={}), compiled).cores_per_replica == 2  # then checked


@pytest.mark.parametrize("args, env, message", [
    ({"max_input_tokens": 300, "max_total_tokens": 200}, {}, "`max_input_tokens` (300) must be < `max_total_tokens` (200)"),
    ({}, {"MAX_INPUT_TOKENS": "512", "MAX_TOTAL_TOKENS": "512"}, "`max_input_tokens` (512) must be < `max_total_tokens` (512)"),
    ({"max_input_tokens": 100, "max_batch_prefill_tokens": 50}, {}, "`max_batch_prefill_tokens` (50) must be >= `max_input_tokens` (100)"),
    ({}, {"MAX_BATCH_SIZE": "0"}, "`max_batch_size` (env MAX_BATCH_SIZE): Input should be greater than 0"),
    ({}, {"MAX_BATCH_SIZE": "eight"}, "`max_batch_size` (env MAX_BATCH_SIZE): Input should be a valid integer"),
    ({"insertion": "append"}, {}, "`insertion`: Input should be 'auto', 'insert' or 'rebuild'"),
    ({"max_batch_sise": 8}, {}, "`max_batch_sise`: Extra inputs are not permitted"),
    ({}, {"HF_AUTO_CAST_TYPE": "fp8"}, "`export_auto_cast_type` (env HF_AUTO_CAST_TYPE): Input should be 'bf16', 'fp16'"),
    ({}, {"HF_BATCH_SIZE": "4", "MAX_BATCH_SIZE": "8"}, "HF_BATCH_SIZE (4) and MAX_BATCH_SIZE (8) must be equal"),
    ({"max_total_tokens": 4096}, {"HF_SEQUENCE_LENGTH": "2048"}, "HF_SEQUENCE_LENGTH (2048) and MAX_TOTAL_TOKENS (4096) must be equal"),
])
def test_invalid_settings_name_the_setting(args, env, message):
    with pytest.raises(ConfigError) as error:
        load_config(args, environ=env)
    assert message in str(error.value)


def test_the_torch_backend_computes_with_a_thread_per_cpu_of_its_replica():
    """What a batcher (and the bench's engine and peer) set torch to; below one CPU, torch's own default."""
    assert Config(backend="torch", replica_cpus=2).torch_threads == 2
    assert Config(backend="torch", replica_cpus=1.5).torch_threads == 1
    assert Config(backend="torch", replica_cpus=0.5).torch_threads is None
    assert Config(backend="neuron", replica_cpus=2).torch_threads is None


def test_limits_are_derived_from_the_model_like_neuronx_tgi():
    limits = resolve_limits(Config(), max_positions=1024)
    assert (limits.max_batch_size, limits.max_total_tokens, limits.max_input_tokens) == (8, 1024, 512)
    assert limits.max_batch_prefill_tokens == 8 * 512
    limits = resolve_limits(Config(), max_positions=32768)
    assert limits.max_total_tokens == 4096
    compiled = resolve_limits(Config(), max_positions=8192, compiled_batch_size=4, compiled_sequence_length=2048)
    assert (compiled.max_batch_size, compiled.max_total_tokens, compiled.max_input_tokens,
            compiled.max_batch_prefill_tokens) == (4, 2048, 1024, 4096)
    # neuronx-tgi recommends batch_size x max_input_tokens, and does not require it
    smaller = resolve_limits(Config(max_batch_prefill_tokens=2048), max_positions=8192, compiled_batch_size=4,
                             compiled_sequence_length=2048)
    assert smaller.max_batch_prefill_tokens == 2048


@pytest.mark.parametrize("config, kwargs, message", [
    (Config(max_total_tokens=2048), dict(max_positions=1024), "`max_total_tokens` (2048) must be <= the model's maximum positions (1024)"),
    (Config(max_input_tokens=1024), dict(max_positions=1024), "`max_input_tokens` (1024) must be < `max_total_tokens` (1024)"),
    (Config(max_batch_size=8), dict(max_positions=4096, compiled_batch_size=4, compiled_sequence_length=4096),
     "`max_batch_size` (8) must be equal to the compiled model's batch_size (4)"),
    (Config(max_total_tokens=1024), dict(max_positions=4096, compiled_batch_size=4, compiled_sequence_length=4096),
     "`max_total_tokens` (1024) must be equal to the compiled model's sequence_length (4096)"),
    (Config(max_batch_prefill_tokens=500), dict(max_positions=1024),
     "`max_batch_prefill_tokens` (500) must be >= `max_input_tokens` (512)"),
])
def test_inconsistent_limits_fail_at_start(config, kwargs, message):
    with pytest.raises(ConfigError) as error:
        resolve_limits(config, **kwargs)
    assert message in str(error.value)
