"""The `torch` backend: a Llama forward over a static KV cache, on CPU or CUDA.

In the manner of gpt-fast: the cache is preallocated once at `[batch_size, kv_heads, max_tokens + 1,
head_dim]` per layer and written at explicit per-row positions, which is also how a compiled Neuron
graph works. Weights are read from any Hugging Face `LlamaForCausalLM` safetensors checkpoint (q/k/v
and gate/up fused into one matmul each), and the arithmetic follows `transformers`' Llama step for
step (RMSNorm in float32, the same rotary tables), so greedy tokens match `generate`.

Every row's result depends on that row only: a prefill runs just the rows it names, right-padded to a
common length (the causal mask already keeps a row's real tokens away from its padding), and a decode
runs the contiguous span of rows covering the ones it names, feeding the gaps a filler token written
to a scratch position (the extra `+ 1`) that attention never reads.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from . import PrefillOutput

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
PROMPT_LOGPROBS_CHUNK = 256  # prompt positions whose logprobs are computed at once


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class Layer:
    """One decoder layer's weights; q/k/v and gate/up fused into one matmul each."""

    input_norm: torch.Tensor
    qkv: torch.Tensor  # [(H + 2 KVH) x D, hidden]
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 x intermediate, hidden]
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


def _cat(*tensors):
    return None if tensors[0] is None else torch.cat(tensors)


def build_layers(state: dict[str, torch.Tensor], n_layers: int) -> list[Layer]:
    """Take Hugging Face's per-layer tensors out of `state` (freeing them as it goes)."""
    layers = []
    for i in range(n_layers):
        p = f"model.layers.{i}."
        get = lambda name: state.pop(p + name, None)  # noqa: E731
        layers.append(Layer(
            input_norm=get("input_layernorm.weight"),
            qkv=_cat(get("self_attn.q_proj.weight"), get("self_attn.k_proj.weight"), get("self_attn.v_proj.weight")),
            qkv_bias=_cat(get("self_attn.q_proj.bias"), get("self_attn.k_proj.bias"), get("self_attn.v_proj.bias")),
            o=get("self_attn.o_proj.weight"),
            o_bias=get("self_attn.o_proj.bias"),
            post_norm=get("post_attention_layernorm.weight"),
            gate_up=_cat(get("mlp.gate_proj.weight"), get("mlp.up_proj.weight")),
            gate_up_bias=_cat(get("mlp.gate_proj.bias"), get("mlp.up_proj.bias")),
            down=get("mlp.down_proj.weight"),
            down_bias=get("mlp.down_proj.bias"),
        ))
    return layers


def rotary_tables(config, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, [positions, head_dim], computed exactly as transformers' LlamaRotaryEmbedding."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    freqs = (inv_freq[None, :, None].float() @ torch.arange(positions)[None, None, :].float()).transpose(1, 2)[0]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention_scaling, emb.sin() * attention_scaling


def load_config(model_dir: Path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"The torch backend runs Llama-architecture models ({', '.join(SUPPORTED_MODEL_TYPES)}); "
            f"{model_dir} is a `{config.model_type}` model"
        )
    return config


def _load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No safetensors weights in {model_dir}: the torch backend loads *.safetensors only")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(model_dir / name)))
    return state


class TorchBackend:
    """`Backend` for Llama-architecture checkpoints on a torch device (CPU or CUDA)."""

    prefills_subset = True
    samples_on_device = False

    def __init__(self, model_dir: str | Path, batch_size: int, max_tokens: int, dtype: str = "float32", device: str = "cpu"):
        model_dir = Path(model_dir)
        config = load_config(model_dir)
        if getattr(config, "sliding_window", None) and config.sliding_window < max_tokens:
            raise ValueError(
                f"The torch backend has no sliding-window attention: `max_total_tokens` ({max_tokens}) must be "
                f"<= the model's sliding_window ({config.sliding_window})"
            )
        self.batch_size = batch_size
        self.max_tokens = self.max_prefill_tokens = max_tokens
        self.vocab_size = config.vocab_size
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.description = f"torch {self.device.type} {dtype}"
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.attn_scale = self.head_dim**-0.5

        state = {k: v.to(self.device, self.dtype) for k, v in _load_state_dict(model_dir).items()}
        self.embed = state.pop("model.embed_tokens.weight")
        self.norm = state.pop("model.norm.weight")
        self.lm_head = state.pop("lm_head.weight", None)
        if self.lm_head is None:
            if not getattr(config, "tie_word_embeddings", False):
                raise ValueError(f"{model_dir} has no lm_head.weight and does not tie word embeddings")
            self.lm_head = self.embed
        self.layers = build_layers(state, config.num_hidden_layers)
        unused = [k for k in state if not k.endswith("rotary_emb.inv_freq")]
        if unused or any(layer.qkv is None for layer in self.layers):
            raise ValueError(f"{model_dir} is not a Llama checkpoint this backend can read (unexpected: {unused[:5]})")

        # One scratch position past the end, where decode writes for filler rows (never attended to).
        self.scratch_position = max_tokens
        cos, sin = rotary_tables(config, max_tokens + 1)
        self.cos = cos.to(self.device, self.dtype)
        self.sin = sin.to(self.device, self.dtype)
        shape = (batch_size, self.kv_heads, max_tokens + 1, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        logger.info("torch backend: %s, %d rows x %d tokens, %s", model_dir, batch_size, max_tokens, self.description)

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _attention_inputs(self, layer: Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        # x: [B, S, hidden]; cos, sin broadcast to [B, 1, S, D] → q [B, H, S, D], k and v [B, KVH, S, D]
        b, s, _ = x.shape
        qkv = F.linear(rms_norm(x, layer.input_norm, self.eps), layer.qkv, layer.qkv_bias)
        q, k, v = qkv.view(b, s, self.heads + 2 * self.kv_heads, self.head_dim).transpose(1, 2).split(
            [self.heads, self.kv_heads, self.kv_heads], dim=1
        )
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def _finish_layer(self, layer: Layer, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        b, _, s, _ = attn.shape  # [B, H, S, D]
        x = x + F.linear(attn.transpose(1, 2).reshape(b, s, self.heads * self.head_dim), layer.o, layer.o_bias)
        gate, up = F.linear(rms_norm(x, layer.post_norm, self.eps), layer.gate_up, layer.gate_up_bias).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, layer.down, layer.down_bias)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(rms_norm(hidden, self.norm, self.eps), self.lm_head).float()

    @torch.inference_mode()
    def prefill(
        self, rows: Sequence[int], token_ids: Sequence[Sequence[int]], prompt_logprobs: bool = False, sampling=None
    ) -> PrefillOutput:
        lengths = [len(ids) for ids in token_ids]
        width = max(lengths)
        padded = self._tensor([list(ids) + [0] * (width - len(ids)) for ids in token_ids])  # [B, S]
        row_index = self._tensor(list(rows))
        cos, sin = self.cos[:width], self.sin[:width]  # [S, D], broadcast over [B, H]

        x = F.embedding(padded, self.embed)
        for layer, k_cache, v_cache in zip(self.layers, self.k_cache, self.v_cache):
            q, k, v = self._attention_inputs(layer, x, cos, sin)
            k_cache[row_index, :, :width] = k
            v_cache[row_index, :, :width] = v
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.attn_scale, enable_gqa=True)
            x = self._finish_layer(layer, x, attn)

        last = x[torch.arange(len(rows), device=self.device), self._tensor(lengths) - 1]  # [B, hidden]
        logits = self._logits(last)
        if not prompt_logprobs:
            return PrefillOutput(logits=logits)
        per_row = []
        for i, n in enumerate(lengths):
            chosen = [torch.tensor([float("nan")], device=self.device)]  # the first token has no logprob
            # A few hundred positions at a time: a 4k prompt's logprobs over a 128k vocabulary are 2 GB at once.
            for start in range(0, n - 1, PROMPT_LOGPROBS_CHUNK):
                end = min(start + PROMPT_LOGPROBS_CHUNK, n - 1)
                logprobs = torch.log_softmax(self._logits(x[i, start:end]), dim=-1)
                chosen.append(logprobs.gather(-1, padded[i, start + 1 : end + 1, None])[:, 0])
            per_row.append(torch.cat(chosen).cpu())
        return PrefillOutput(logits=logits, prompt_logprobs=per_row)

    @torch.inference_mode()
    def decode(self, rows: Sequence[int], token_ids: Sequence[int], positions: Sequence[int], sampling=None) -> torch.Tensor:
        first, last = min(rows), max(rows)
        span_tokens = [0] * (last - first + 1)
        span_positions = [self.scratch_position] * (last - first + 1)
        for row, token, position in zip(rows, token_ids, positions):
            span_tokens[row - first], span_positions[row - first] = token, position
        context = max(positions) + 1
        pos = self._tensor(span_positions)  # [B]
        span_rows = torch.arange(first, last + 1, device=self.device)
        cos, sin = self.cos[pos][:, None, None], self.sin[pos][:, None, None]  # [B, 1, 1, D]
        mask = (torch.arange(context, device=self.device)[None, :] <= pos[:, None])[:, None, None]  # [B, 1, 1, L]

        x = F.embedding(self._tensor(span_tokens)[:, None], self.embed)  # [B, 1, hidden]
        for layer, k_cache, v_cache in zip(self.layers, self.k_cache, self.v_cache):
            q, k, v = self._attention_inputs(layer, x, cos, sin)
            k_cache[span_rows, :, pos] = k[:, :, 0]
            v_cache[span_rows, :, pos] = v[:, :, 0]
            keys, values = k_cache[first : last + 1, :, :context], v_cache[first : last + 1, :, :context]
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.attn_scale, enable_gqa=True)
            x = self._finish_layer(layer, x, attn)

        wanted = [row - first for row in rows]
        if wanted != list(range(len(span_tokens))):
            x = x[self._tensor(wanted)]
        return self._logits(x[:, 0])
