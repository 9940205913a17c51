"""From a `Config` to a ready `Engine`: find the model, load its tokenizer, open the backend, settle limits.

Each backend has an `open_*` function returning the backend and the limits it can run with; the
Neuron one is imported only when chosen, so nothing else ever imports Neuron libraries.
"""

from __future__ import annotations

import logging

from .backends import Backend
from .config import Config, Limits, resolve_limits
from .engine import Engine
from .errors import ConfigError
from .model_files import eos_token_ids, load_tokenizer, resolve_model_dir
from .scheduler import InsertionPolicy, PrefillPolicy

logger = logging.getLogger(__name__)


def model_limits(config: Config, model_dir) -> Limits:
    """The limits a deployment runs with, from the model's configuration files alone (no weights).

    The HTTP ingress validates with these, and each batcher's engine runs with the same.
    """
    if config.backend in ("auto", "torch"):
        from .backends.torch_llama import load_config

        return resolve_limits(config, max_positions=load_config(model_dir).max_position_embeddings)
    raise ConfigError(f"`backend`: {config.backend!r} is not available in this build")


def open_torch_backend(config: Config, model_dir) -> tuple[Backend, Limits]:
    from .backends.torch_llama import TorchBackend, load_config

    model_config = load_config(model_dir)
    limits = model_limits(config, model_dir)
    dtype = config.dtype
    if dtype == "auto":
        dtype = "float32" if config.device == "cpu" else str(getattr(model_config, "torch_dtype", "bfloat16")).removeprefix("torch.")
    backend = TorchBackend(model_dir, limits.max_batch_size, limits.max_total_tokens, dtype=dtype, device=config.device)
    return backend, limits


def open_backend(config: Config, model_dir) -> tuple[Backend, Limits]:
    if config.backend in ("auto", "torch"):
        return open_torch_backend(config, model_dir)
    raise ConfigError(f"`backend`: {config.backend!r} is not available in this build")


def build_engine(config: Config) -> Engine:
    model_dir = resolve_model_dir(config)
    tokenizer = load_tokenizer(model_dir)
    backend, limits = open_backend(config, model_dir)
    engine = Engine(
        backend,
        tokenizer,
        limits,
        eos_token_ids(model_dir, tokenizer),
        insertion=InsertionPolicy(config.insertion),
        prefill_policy=PrefillPolicy(config.waiting_served_ratio, config.max_waiting_tokens),
    )
    logger.info("engine ready: %s on %s, %s, insertion=%s", config.model_id, backend.description, limits, config.insertion)
    return engine
