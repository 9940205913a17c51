"""The `torch` backend: a Llama forward over a static KV cache, on CPU or CUDA.

In the manner of gpt-fast: the cache is preallocated once at `[batch_size, kv_heads, max_tokens + 1,
head_dim]` per layer and written at explicit per-row positions, which is also how a compiled Neuron
graph works. Parameter names are Hugging Face's, so any `LlamaForCausalLM` safetensors checkpoint
loads as is, and the arithmetic follows `transformers`' Llama step for step (RMSNorm in float32, the
same rotary tables), so greedy tokens match `generate`.

Every row's result depends on that row only: a prefill runs just the rows it names, right-padded to a
common length (the causal mask already keeps a row's real tokens away from its padding), and a decode
runs the contiguous span of rows covering the ones it names, feeding the gaps a filler token written
to a scratch position (the extra `+ 1`) that attention never reads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import PrefillOutput

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral")


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        bias = getattr(config, "attention_bias", False)
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=bias)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        # x: [B, S, hidden]; cos, sin: [B, 1, S, head_dim] → q [B, H, S, D], k and v [B, KVH, S, D]
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k, v

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        b, _, s, _ = attn.shape  # [B, H, S, D]
        return self.o_proj(attn.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)


class Decoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForStaticBatch(nn.Module):
    """Hugging Face's Llama parameters with a forward written for a static, per-row KV cache."""

    def __init__(self, config):
        super().__init__()
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


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

    def __init__(self, model_dir: str | Path, batch_size: int, max_tokens: int, dtype: str = "float32", device: str = "cpu"):
        model_dir = Path(model_dir)
        config = load_config(model_dir)
        if getattr(config, "sliding_window", None) and config.sliding_window < max_tokens:
            raise ValueError(
                f"The torch backend has no sliding-window attention: `max_total_tokens` ({max_tokens}) must be "
                f"<= the model's sliding_window ({config.sliding_window})"
            )
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.vocab_size = config.vocab_size
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.description = f"torch {self.device.type} {dtype}"

        with torch.device("meta"):
            model = LlamaForStaticBatch(config)
        state = _load_state_dict(model_dir)
        state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
        if "lm_head.weight" not in state and getattr(config, "tie_word_embeddings", False):
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.attn_scale = self.model.model.layers[0].self_attn.head_dim ** -0.5

        # One scratch position past the end, where decode writes for filler rows (never attended to).
        self.scratch_position = max_tokens
        cos, sin = rotary_tables(config, max_tokens + 1)
        self.cos = cos.to(self.device, self.dtype)
        self.sin = sin.to(self.device, self.dtype)
        attn = self.model.model.layers[0].self_attn
        shape = (batch_size, attn.kv_heads, max_tokens + 1, attn.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.model.model.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.model.model.layers]
        logger.info("torch backend: %s, %d rows x %d tokens", model_dir, batch_size, max_tokens)

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def prefill(
        self, rows: Sequence[int], token_ids: Sequence[Sequence[int]], prompt_logprobs: bool = False
    ) -> PrefillOutput:
        lengths = [len(ids) for ids in token_ids]
        width = max(lengths)
        padded = self._tensor([list(ids) + [0] * (width - len(ids)) for ids in token_ids])  # [B, S]
        row_index = self._tensor(list(rows))
        cos, sin = self.cos[:width][None, None], self.sin[:width][None, None]  # [1, 1, S, D]

        x = self.model.model.embed_tokens(padded)
        for layer, k_cache, v_cache in zip(self.model.model.layers, self.k_cache, self.v_cache):
            attn = layer.self_attn
            q, k, v = attn.project(layer.input_layernorm(x), cos, sin)
            k_cache[row_index, :, :width] = k
            v_cache[row_index, :, :width] = v
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.attn_scale, enable_gqa=True)
            x = x + attn.output(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))

        last = x[torch.arange(len(rows), device=self.device), self._tensor(lengths) - 1]  # [B, hidden]
        logits = self.model.lm_head(self.model.model.norm(last)).float()
        if not prompt_logprobs:
            return PrefillOutput(logits=logits)
        all_logprobs = torch.log_softmax(self.model.lm_head(self.model.model.norm(x)).float(), dim=-1)
        per_row = []
        for i, n in enumerate(lengths):
            chosen = all_logprobs[i, : n - 1].gather(-1, padded[i, 1:n, None])[:, 0]
            per_row.append(torch.cat([torch.tensor([float("nan")], device=self.device), chosen]).cpu())
        return PrefillOutput(logits=logits, prompt_logprobs=per_row)

    @torch.inference_mode()
    def decode(self, rows: Sequence[int], token_ids: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
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

        x = self.model.model.embed_tokens(self._tensor(span_tokens)[:, None])  # [B, 1, hidden]
        for layer, k_cache, v_cache in zip(self.model.model.layers, self.k_cache, self.v_cache):
            attn = layer.self_attn
            q, k, v = attn.project(layer.input_layernorm(x), cos, sin)
            k_cache[span_rows, :, pos] = k[:, :, 0]
            v_cache[span_rows, :, pos] = v[:, :, 0]
            keys, values = k_cache[first : last + 1, :, :context], v_cache[first : last + 1, :, :context]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.attn_scale, enable_gqa=True)
            x = x + attn.output(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))

        wanted = self._tensor([row - first for row in rows])
        return self.model.lm_head(self.model.model.norm(x[wanted, 0])).float()
