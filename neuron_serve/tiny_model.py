"""The built-in default model: a small, deterministic Llama written in standard Hugging Face format.

No weights can be downloaded where neuron-serve is developed and tested, so the project makes its own
model: seeded random weights, a byte-level BPE tokenizer trained on text shipped with the package
(`tiny_model_corpus.txt`), a ChatML chat template and a generation config. The same inputs give the
same bytes on every run, and stock `transformers` loads the result.

    python -m neuron_serve.tiny_model OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

TINY_MODEL_ID = "neuron-serve/tiny-llama"
FORMAT_VERSION = 2  # bump when the generated files change, so caches are rebuilt

VOCAB_SIZE = 2048
BOS, EOS, IM_START, IM_END = "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, IM_START, IM_END]

# ChatML, opened with BOS: tokenize the rendered prompt without adding special tokens again.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": "float32",
    "use_cache": True,
}

# Larger than the usual 0.02 for the output layer, so that logits are peaked: greedy choices then
# never hinge on the last bits of a float, and the engine can be compared token for token with
# transformers.
LM_HEAD_STD = 0.25
SEED = 1234


def corpus_path() -> Path:
    return Path(__file__).with_name("tiny_model_corpus.txt")


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(corpus_path())], trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]),
        ]
    )
    return tokenizer


def _weights(config: dict) -> dict:
    import torch

    generator = torch.Generator().manual_seed(SEED)
    hidden, inter, head_dim = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q_out = config["num_attention_heads"] * head_dim
    kv_out = config["num_key_value_heads"] * head_dim

    def normal(*shape, std=config["initializer_range"]):
        return torch.randn(*shape, generator=generator) * std

    tensors = {"model.embed_tokens.weight": normal(config["vocab_size"], hidden, std=1.0)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = torch.ones(hidden)
        tensors[p + "self_attn.q_proj.weight"] = normal(q_out, hidden)
        tensors[p + "self_attn.k_proj.weight"] = normal(kv_out, hidden)
        tensors[p + "self_attn.v_proj.weight"] = normal(kv_out, hidden)
        tensors[p + "self_attn.o_proj.weight"] = normal(hidden, q_out)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
        tensors[p + "mlp.gate_proj.weight"] = normal(inter, hidden)
        tensors[p + "mlp.up_proj.weight"] = normal(inter, hidden)
        tensors[p + "mlp.down_proj.weight"] = normal(hidden, inter)
    tensors["model.norm.weight"] = torch.ones(hidden)
    tensors["lm_head.weight"] = normal(config["vocab_size"], hidden, std=LM_HEAD_STD)
    return {name: t.contiguous() for name, t in sorted(tensors.items())}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_tiny_model(out_dir: str | os.PathLike) -> Path:
    """Write the tiny model's files into `out_dir` (created if needed) and return its path."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer()
    tokenizer.save(str(out / "tokenizer.json"))
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}

    config = dict(MODEL_CONFIG, vocab_size=tokenizer.get_vocab_size(), bos_token_id=ids[BOS], eos_token_id=ids[EOS])
    _write_json(out / "config.json", config)
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": ids[BOS], "eos_token_id": [ids[EOS], ids[IM_END]], "do_sample": False},
    )
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_input_names": ["input_ids", "attention_mask"],  # no token_type_ids: Llama's generate refuses them
            "bos_token": BOS,
            "eos_token": IM_END,
            "pad_token": EOS,
            "model_max_length": config["max_position_embeddings"],
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": {
                str(ids[t]): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                              "normalized": False, "single_word": False}
                for t in SPECIAL_TOKENS
            },
        },
    )
    save_file(_weights(config), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "neuron-serve"


def ensure_tiny_model(cache_dir: str | os.PathLike | None = None) -> Path:
    """The tiny model's directory in the cache, built on first use (atomically) and reused after."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    target = root / f"tiny-llama-v{FORMAT_VERSION}"
    if (target / "model.safetensors").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-llama-", dir=root))
    try:
        build_tiny_model(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first: theirs is identical
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write neuron-serve's built-in tiny Llama model to a directory.")
    parser.add_argument("out_dir", help="directory to write config.json, model.safetensors and tokenizer files into")
    args = parser.parse_args(argv)
    out = build_tiny_model(args.out_dir)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
