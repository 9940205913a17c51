"""A CPU stand-in for optimum-neuron 0.4.5's compiled `NeuronModelForCausalLM`, driven by transformers' Llama.

Its public methods have the installed optimum-neuron signatures (a test compares them), it is
configured by the real `NxDNeuronConfig`, and its `forward` behaves as the compiled graphs and their
wrappers do (read in `optimum/neuron/models/inference/backend/modules/decoder/`):

- routing: context encoding iff more than one token and positions start at 0, else token generation;
- static shapes: at most `max_batch_size` rows; prompts padded to `max_context_length` (ids with 0,
  positions with 1) — a longer prompt is refused here, where the device would crop it silently;
- the KV cache is `[max_batch_size, sequence_length]` positions, kept as the tokens written there:
  with continuous batching a prefill rewrites only the rows named by `seq_ids`; without it every row
  is rewritten from position 0 (missing rows get copies of row 0); decode pads to `batch_size` with
  copies of row 0 written into the unnamed rows (the device's hazard), writes each token at its
  position and attends to the positions before it; reading a position nothing was written to fails;
- output: float32 logits `[n, 1, vocab padded to a multiple of tp_degree]` (padding at the float32
  minimum) taken at each row's first maximal position, or token ids `[n]` with on-device sampling,
  whose parameters are validated as the device validates them.

Logits come from running the Llama on the row's cached tokens: slow, exact, and independent of our
torch backend.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import torch
from optimum.neuron.models.inference.backend.config import NxDNeuronConfig

SAVED_FIELDS = ("batch_size", "max_batch_size", "sequence_length", "max_context_length", "tp_degree",
                "continuous_batching", "on_device_sampling", "max_topk", "checkpoint_id", "checkpoint_revision")
UNWRITTEN = -1
# transformers' from_pretrained is not thread-safe: accelerate's `init_empty_weights` swaps
# `nn.Module.register_parameter` for the whole process, and two loads at once can leave the swap in
# place, so that every later model in the process is built on the meta device. Replicas are processes;
# tests that play them with threads load one at a time.
_LOADING = threading.Lock()


def validate_sampling_params(params: torch.Tensor, max_topk: int) -> None:
    """optimum-neuron's checks (generation/sampling.py), with its messages."""
    if params.dim() != 2 or params.shape[1] != 3:
        raise ValueError(f"Expected tensor of shape (batch_size, 3), but got {params.shape}")
    top_k, top_p, temperature = params[:, 0], params[:, 1], params[:, 2]
    if not torch.all((top_k == -1) | ((top_k > 0) & (top_k <= max_topk))):
        raise ValueError(f"Invalid top-k values found. top-k must be -1 or greater than 0 but less than or equal to {max_topk}. Found {top_k}.")
    if not torch.all(top_k == top_k.round()):
        raise ValueError(f"Invalid top-k values found. top-k values should be able to be represented as integer values, but found decimal parts. Found {top_k=}.")
    if not torch.all((top_p > 0.0) & (top_p <= 1.0)):
        raise ValueError(f"Invalid top-p values found. top-p must be in the range (0.0, 1.0]. Found {top_p=}.")
    if not torch.all(temperature > 0.0):
        raise ValueError(f"Invalid temperature values found. Temperature must be strictly greater than 0.0. Found {temperature=}.")


def available_cores() -> int:
    """The cores this process may use, counted by optimum-neuron's own code (on an inf2.48xlarge's
    12 devices): it reads NEURON_RT_VISIBLE_CORES as Ray and the Neuron runtime set it."""
    from unittest import mock

    from optimum.neuron.utils import system

    with mock.patch.object(system, "get_neuron_devices_count", return_value=12), \
            mock.patch.object(system, "cores_per_device", return_value=2):
        return system.get_available_cores()


class NeuronModelStandIn:
    """Same public surface as optimum-neuron's decoder model class, on CPU."""

    export_calls: list[dict] = []  # every export, for tests of the compile-once path
    load_calls: list[dict] = []  # every from_pretrained: its directory and token

    def __init__(self, model_dir: str | Path, neuron_config: NxDNeuronConfig):
        from transformers import AutoConfig, LlamaForCausalLM

        self.neuron_config = neuron_config
        self.config = AutoConfig.from_pretrained(model_dir)
        self.source_dir = Path(model_dir)
        with _LOADING:
            self.llama = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
        rows, positions = neuron_config.max_batch_size, neuron_config.sequence_length
        self.kv = torch.full((rows, positions), UNWRITTEN, dtype=torch.long)  # the token cached at each position
        self.generator = torch.Generator().manual_seed(0)  # the device's own RNG, seeded once
        self.calls: list[tuple[str, list[int]]] = []  # (graph, seq_ids) of every forward

    # -- the optimum-neuron API --------------------------------------------------------------------

    @classmethod
    def get_neuron_config(cls, model_name_or_path, config=None, token=None, revision=None, instance_type=None,
                          batch_size=None, sequence_length=None, tensor_parallel_size=None):
        batch_size = batch_size or 1
        # As optimum-neuron's Llama (`LlamaNxDModelForCausalLM._get_neuron_config`): it always samples on the device.
        return NxDNeuronConfig(
            checkpoint_id=str(model_name_or_path), checkpoint_revision=revision, batch_size=batch_size,
            sequence_length=sequence_length or 1024, tp_degree=tensor_parallel_size, torch_dtype="float32",
            target=instance_type or "trn1", continuous_batching=batch_size > 1, on_device_sampling=True, fused_qkv=True,
        )

    @classmethod
    def export(cls, model_id, neuron_config, config=None, token=None, revision=None, load_weights=False, **kwargs):
        cls.export_calls.append({"model_id": model_id, "batch_size": neuron_config.batch_size,
                                 "sequence_length": neuron_config.sequence_length, "tp_degree": neuron_config.tp_degree,
                                 "torch_dtype": str(neuron_config.torch_dtype)})
        return cls(model_id, neuron_config)

    @classmethod
    def from_pretrained(cls, model_id, **kwargs):
        path = Path(model_id)
        cls.load_calls.append({"path": path, "token": kwargs.get("token")})
        saved = json.loads((path / "neuron_config.json").read_text())
        fields = {k: saved[k] for k in SAVED_FIELDS if k in saved}
        available = available_cores()
        if fields["tp_degree"] > available:  # as optimum-neuron's NeuronPreTrainedModel._from_pretrained checks
            raise ValueError(f"The specified checkpoint requires at least {fields['tp_degree']} Neuron cores "
                             f"but only {available} are available.")
        return cls(path, NxDNeuronConfig(torch_dtype=saved.get("torch_dtype", "float32"), **fields))

    def save_pretrained(self, save_directory, **kwargs):
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "model.safetensors"):
            shutil.copy(self.source_dir / name, out / name)
        saved = {k: getattr(self.neuron_config, k) for k in SAVED_FIELDS}
        saved["torch_dtype"] = str(self.neuron_config.torch_dtype).removeprefix("torch.")
        (out / "neuron_config.json").write_text(json.dumps(saved, indent=2, sort_keys=True))

    def reset(self):
        self.kv.fill_(UNWRITTEN)

    def forward(self, input_ids, position_ids, seq_ids=None, sampling_params=None, output_attentions=None,
                output_hidden_states=None, return_dict=None):
        name = type(self).__name__
        if output_attentions:
            raise ValueError(f"output_attentions is not supported for {name}")
        if output_hidden_states:
            raise ValueError(f"output_hidden_states is not supported for {name}")
        if return_dict:
            raise ValueError(f"return_dict is not supported for {name}")
        nc = self.neuron_config
        if nc.on_device_sampling:
            validate_sampling_params(sampling_params, nc.max_topk)
        n = seq_ids.shape[0]
        if n > nc.max_batch_size:
            raise ValueError(f"Input batch size {n} exceeds the maximum batch size {nc.max_batch_size}.")
        if sampling_params is None or sampling_params.shape != (n, 3):
            raise ValueError("sampling_params must be a (batch, 3) tensor: the compiled graphs take it on every call")
        with torch.inference_mode():
            if input_ids.shape[-1] > 1 and not position_ids.min().item():
                logits = self._context_encoding(input_ids, position_ids, seq_ids)
            elif input_ids.shape[-1] == 1:
                logits = self._token_generation(input_ids, position_ids, seq_ids)
            else:
                raise ValueError("no compiled graph takes several tokens at positions > 0 (chunked prefill)")
        if nc.on_device_sampling:
            return self._sample(logits, sampling_params)
        return self._pad_vocab(logits)[:, None, :]

    __call__ = forward

    # -- the graphs --------------------------------------------------------------------------------

    def _context_encoding(self, input_ids, position_ids, seq_ids) -> torch.Tensor:
        nc = self.neuron_config
        width = input_ids.shape[-1]
        if width > nc.max_context_length:
            raise ValueError(f"prompt width {width} exceeds max_context_length {nc.max_context_length} (the device would crop it)")
        pad = nc.max_context_length - width
        input_ids = torch.nn.functional.pad(input_ids, (0, pad), value=0)
        position_ids = torch.nn.functional.pad(position_ids, (0, pad), value=1)
        last = position_ids.argmax(dim=1)  # the first maximal position of each row
        if nc.continuous_batching:  # one row per call, written into KV row seq_ids[i]
            kv_rows = seq_ids.tolist()
            self.calls.append(("context_encoding", kv_rows))
            for i, row in enumerate(kv_rows):
                self.kv[row] = UNWRITTEN
                self.kv[row, : nc.max_context_length] = input_ids[i]
        else:  # the whole batch: row i is KV row i, missing rows are copies of row 0
            n = input_ids.shape[0]
            kv_rows = list(range(n))
            self.calls.append(("context_encoding", list(range(nc.batch_size))))
            self.kv.fill_(UNWRITTEN)
            for row in range(nc.batch_size):
                self.kv[row, : nc.max_context_length] = input_ids[row if row < n else 0]
        return torch.stack([self._logits_at(row, int(last[i])) for i, row in enumerate(kv_rows)])

    def _token_generation(self, input_ids, position_ids, seq_ids) -> torch.Tensor:
        nc = self.neuron_config
        n = input_ids.shape[0]
        if nc.continuous_batching:
            named = seq_ids.tolist()
            padded = named + [r for r in range(nc.max_batch_size) if r not in named][: nc.batch_size - n]
        else:
            named = list(range(n))
            padded = list(range(nc.batch_size))
        self.calls.append(("token_generation", list(named)))
        tokens = [int(input_ids[i if i < n else 0, 0]) for i in range(len(padded))]
        positions = [int(position_ids[i if i < n else 0, 0]) for i in range(len(padded))]
        for row, token, position in zip(padded, tokens, positions):
            if position >= nc.sequence_length:
                raise ValueError(f"position {position} is outside the compiled sequence_length {nc.sequence_length}")
            self.kv[row, position] = token
        return torch.stack([self._logits_at(row, positions[i]) for i, row in enumerate(padded[:n])])

    def _logits_at(self, row: int, position: int) -> torch.Tensor:
        tokens = self.kv[row, : position + 1]
        if (tokens == UNWRITTEN).any():
            raise RuntimeError(f"KV row {row} holds nothing at some position before {position}: a device would read garbage")
        return self.llama(tokens[None]).logits[0, -1].float()

    def _pad_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        tp = self.neuron_config.tp_degree
        padded = -(-logits.shape[-1] // tp) * tp
        return torch.nn.functional.pad(logits, (0, padded - logits.shape[-1]), value=torch.finfo(torch.float32).min)

    def _sample(self, logits: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """As the device's sampler (`generation/sampling.py`, `_multinomial_sample`): the top k scores, divided
        by the temperature, cut to the top p, then a uniform draw against their cumulative probabilities. It
        never raises: scores past float32's range make NaNs, no comparison holds, and the top token is taken."""
        out = []
        for row_logits, (top_k, top_p, temperature) in zip(logits, params.tolist()):
            values, indices = row_logits.topk(int(top_k))
            values = values / temperature
            if top_p < 1.0:
                cumulative = torch.softmax(values, dim=-1).cumsum(0)
                cut = cumulative > max(float(cumulative.min()), top_p)
                cut[0] = False  # the first token is always kept
                values = values.masked_fill(cut, -3000.0)
            cumulative = torch.softmax(values, dim=-1).cumsum(0)
            drawn = int((torch.rand(1, generator=self.generator) > cumulative).sum())
            out.append(int(indices[min(drawn, len(indices) - 1)]))
        return torch.tensor(out, dtype=torch.int32)


def compile_standin(model_dir: Path, out_dir: Path, *, batch_size: int, sequence_length: int, tp_degree: int = 2,
                    continuous_batching: bool = True, on_device_sampling: bool = False, max_context_length: int | None = None) -> Path:
    """A "compiled model" directory for the stand-in, with the source's tokenizer files beside it."""
    nc = NxDNeuronConfig(batch_size=batch_size, sequence_length=sequence_length, tp_degree=tp_degree,
                         continuous_batching=continuous_batching, on_device_sampling=on_device_sampling,
                         torch_dtype="float32", max_context_length=max_context_length)
    NeuronModelStandIn(model_dir, nc).save_pretrained(out_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(Path(model_dir) / name, Path(out_dir) / name)
    return Path(out_dir)
