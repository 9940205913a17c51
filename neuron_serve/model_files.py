"""Where a model's files come from: the built-in tiny model, a local directory, or the Hugging Face hub.

`resolve_model_dir` returns a local directory in standard Hugging Face layout. Hub downloads use
`HF_TOKEN` for gated repositories and the usual hub cache (`HF_HOME`); `weights=False` fetches only
the configuration and tokenizer files, which is all the HTTP ingress needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import Config
from .errors import ConfigError
from .tiny_model import TINY_MODEL_ID, ensure_tiny_model

NEURON_CONFIG_FILE = "neuron_config.json"
TOKENIZER_AND_CONFIG_FILES = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
# Weights in formats nothing here reads: Meta's originals (Llama 3's `original/`, 16 GB for 8B), other frameworks'.
UNREAD_WEIGHTS = ["original/*", "*.pth", "*.h5", "*.msgpack", "*.onnx", "*.gguf"]


def on_the_hub(model_id: str) -> bool:
    """A hub repository, not the built-in tiny model (built locally) nor a local directory."""
    return model_id != TINY_MODEL_ID and not Path(model_id).expanduser().exists()


def resolve_model_dir(config: Config, weights: bool = True) -> Path:
    if config.model_id == TINY_MODEL_ID:
        return ensure_tiny_model(config.cache_dir)
    local = Path(config.model_id).expanduser()
    if local.is_dir():
        return local
    if local.is_absolute() or config.model_id.startswith("."):
        raise ConfigError(f"`model_id`: {config.model_id} is not a directory")
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            config.model_id,
            revision=config.revision,
            token=config.token,
            allow_patterns=None if weights else TOKENIZER_AND_CONFIG_FILES,
            ignore_patterns=UNREAD_WEIGHTS,
        )
    except Exception as e:
        raise ConfigError(
            f"`model_id`: {config.model_id} is neither a local directory nor a reachable hub model "
            f"({type(e).__name__}: {e}). Set HF_TOKEN for a gated model."
        ) from None
    return Path(path)


def read_neuron_config(model_dir: Path) -> dict[str, Any] | None:
    """A compiled Neuron model's `neuron_config.json` (optimum-neuron's), None for any other model."""
    path = Path(model_dir) / NEURON_CONFIG_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def load_tokenizer(model_dir: Path, token: str | None = None):
    """The model's fast tokenizer; a compiled Neuron model without one uses its checkpoint's (a gated one
    with `token`)."""
    from transformers import AutoTokenizer

    source: str | Path = model_dir
    revision = None
    saved = None if (Path(model_dir) / "tokenizer.json").is_file() else read_neuron_config(model_dir)
    if saved and saved.get("checkpoint_id"):
        source, revision = saved["checkpoint_id"], saved.get("checkpoint_revision")
    tokenizer = AutoTokenizer.from_pretrained(source, token=token, revision=revision)
    if not tokenizer.is_fast:
        raise ConfigError(f"{source} has no fast tokenizer (tokenizer.json); neuron-serve needs one")
    return tokenizer


def eos_token_ids(model_dir: Path, tokenizer) -> frozenset[int]:
    """Every end-of-sequence id: the tokenizer's, and the generation config's (else the model config's).
    Both, as vLLM does: a fine-tune often changes one (ChatML's `<|im_end|>` in the tokenizer) and not
    the other, and TGI, which takes the tokenizer's unless the generation config has a list, would then
    generate past the end of the turn."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return frozenset(ids | set(eos if isinstance(eos, list) else [eos]))
    return frozenset(ids)
