"""The one configuration object, built in one place: defaults ← serve_config args ← TGI env vars.

`load_config(args, environ)` is the only reader of the environment. It uses TGI's launcher names
(`MODEL_ID`, `MAX_BATCH_SIZE`, ...) and neuronx-tgi's export names (`HF_BATCH_SIZE`, ...), so a
neuronx-tgi user keeps their settings. Limits the model decides (how many tokens fit, the compiled
batch size) are settled by `resolve_limits` once the model is known; every inconsistency fails at
start with a message naming the setting.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from .errors import ConfigError
from .tiny_model import TINY_MODEL_ID

DEFAULT_BATCH_SIZE = 8  # rows of a torch-backend batch when the model does not impose one
DEFAULT_MAX_TOTAL_TOKENS = 4096  # TGI's cap when max_total_tokens is not set

# Setting → environment variables that set it, first match wins (TGI launcher and neuronx-tgi names).
ENV_NAMES: dict[str, tuple[str, ...]] = {
    "model_id": ("MODEL_ID", "HF_MODEL_ID"),  # HF_MODEL_ID: SageMaker's
    "revision": ("REVISION", "HF_MODEL_REVISION"),
    "hf_token": ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"),
    "dtype": ("DTYPE",),
    "max_batch_size": ("MAX_BATCH_SIZE",),
    "max_input_tokens": ("MAX_INPUT_TOKENS", "MAX_INPUT_LENGTH"),
    "max_total_tokens": ("MAX_TOTAL_TOKENS",),
    "max_batch_prefill_tokens": ("MAX_BATCH_PREFILL_TOKENS",),
    "waiting_served_ratio": ("WAITING_SERVED_RATIO",),
    "max_waiting_tokens": ("MAX_WAITING_TOKENS",),
    "max_concurrent_requests": ("MAX_CONCURRENT_REQUESTS",),
    "max_best_of": ("MAX_BEST_OF",),
    "max_stop_sequences": ("MAX_STOP_SEQUENCES",),
    "max_top_n_tokens": ("MAX_TOP_N_TOKENS",),
    "max_client_batch_size": ("MAX_CLIENT_BATCH_SIZE",),
    "payload_limit": ("PAYLOAD_LIMIT",),
    "api_key": ("API_KEY",),
    "compute_type": ("COMPUTE_TYPE",),
    "cors_allow_origin": ("CORS_ALLOW_ORIGIN",),
    "export_batch_size": ("HF_BATCH_SIZE",),
    "export_sequence_length": ("HF_SEQUENCE_LENGTH",),
    "export_auto_cast_type": ("HF_AUTO_CAST_TYPE",),
    "export_num_cores": ("HF_NUM_CORES",),
}


class Config(BaseModel):
    """Every setting of a deployment. `None` means: derived from the model at start."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The model
    model_id: str = Field(TINY_MODEL_ID, description="hub id, local directory, or the built-in tiny model")
    revision: str | None = None
    hf_token: SecretStr | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    backend: Literal["auto", "torch", "neuron", "simulated"] = Field(
        "auto", description="auto: neuron where the cluster has neuron_cores, torch elsewhere; "
        "simulated: sleeps as an inf2 core group would, for fleet-scale tests"
    )
    simulated_params: float | None = Field(None, gt=0, description="parameters the simulated backend times itself as "
                                           "(None: the model's own)")
    device: str = Field("cpu", description="torch backend device: cpu or cuda")
    cache_dir: str | None = Field(None, description="where built-in and compiled models are kept")

    # The static batch
    max_batch_size: int | None = Field(None, gt=0)
    max_input_tokens: int | None = Field(None, gt=0)
    max_total_tokens: int | None = Field(None, gt=1)
    max_batch_prefill_tokens: int | None = Field(None, gt=0)
    insertion: Literal["auto", "insert", "rebuild"] = Field(
        "auto",
        description="insert: prefill only new rows; rebuild: re-prefill every active row too; "
        "auto: insert unless a compiled Neuron model can only prefill the whole batch",
    )
    waiting_served_ratio: float = Field(
        0.0, ge=0, description="prefill mid-batch once waiting >= ratio x running (0: as soon as a row is free)"
    )
    max_waiting_tokens: int = Field(20, ge=0, description="decode steps after which a waiting request is prefilled anyway")
    stream_interval: int = Field(
        1, gt=0, description="tokens per hand-over from a batcher after a request's first (1: each as it comes; "
        "more: fewer messages per token on a busy host, tokens arrive in bursts)"
    )

    # The HTTP front (TGI router limits)
    max_concurrent_requests: int = Field(128, gt=0)
    max_best_of: int = Field(2, gt=0)
    max_stop_sequences: int = Field(4, ge=0)
    max_top_n_tokens: int = Field(5, ge=0)
    max_client_batch_size: int = Field(4, gt=0)
    payload_limit: int = Field(2_000_000, gt=0)
    api_key: SecretStr | None = None
    compute_type: str | None = Field(None, description="the `x-compute-type` response header (TGI's COMPUTE_TYPE; None: the backend)")
    cors_allow_origin: list[str] = Field(default_factory=list)
    api_key_open_paths: list[str] = Field(
        ["/health", "/ping", "GET /", "/info", "/metrics", "/v1/models", "/chat_tokenize", "/docs", "/api-doc/openapi.json"],
        description="routes open without the API key, as a path or as 'METHOD /path' (default: those TGI leaves open)")
    sse_keep_alive_s: float = Field(15.0, gt=0, description="an SSE comment after this long without an event in a stream (TGI: 15)")
    log_prompts: bool = Field(False, description="debug: log each request's prompt text (never logged otherwise)")
    fault_injection: bool = Field(False, description="tests only: let `NeuronBatcher.inject_fault` make forwards fail")

    # The Ray Serve layout
    cores_per_replica: int = Field(2, ge=0, description="NeuronCores per batcher replica, its tensor-parallel degree (0: CPU replicas)")
    num_replicas: int | None = Field(None, gt=0, description="None: cores on the cluster // cores_per_replica")
    autoscaling_config: dict[str, Any] | None = Field(None, description="Ray Serve autoscaling for the batchers (instead of num_replicas)")
    replica_cpus: float = Field(1.0, ge=0, description="CPUs each batcher replica asks Ray for (host-side sampling)")
    max_queued_per_replica: int | None = Field(None, ge=0, description="requests a replica holds beyond its rows (None: one batch more)")
    ingress_replicas: int = Field(1, gt=0)
    startup_timeout_s: float = Field(1800.0, gt=0, description="a batcher that has not loaded its model by then fails")
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    health_probe_timeout_s: float = Field(5.0, gt=0, description="/health answers 503 when no replica produced a token by then")
    step_timeout_s: float = Field(120.0, gt=0, description="a batcher whose engine step runs longer is unhealthy, and replaced")
    graceful_shutdown_timeout_s: float = Field(30.0, ge=0, description="in-flight requests get this long to finish on shutdown")

    # neuronx-tgi export settings, used when a hub model is not compiled yet
    export_batch_size: int | None = Field(None, gt=0)
    export_sequence_length: int | None = Field(None, gt=1)
    export_auto_cast_type: Literal["bf16", "fp16", "fp32", "bfloat16", "float16", "float32"] | None = None
    export_num_cores: int | None = Field(None, gt=0)

    @property
    def torch_threads(self) -> int | None:
        """The threads the torch backend computes with: one per CPU of `replica_cpus`; None below one CPU
        (torch's default, a thread per core)."""
        return int(self.replica_cpus) if self.backend == "torch" and self.replica_cpus >= 1 else None

    @property
    def token(self) -> str | None:
        """The hub token (HF_TOKEN), for gated repositories."""
        return self.hf_token.get_secret_value() if self.hf_token else None

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.max_input_tokens is not None and self.max_total_tokens is not None:
            if self.max_input_tokens >= self.max_total_tokens:
                raise ValueError(
                    f"`max_input_tokens` ({self.max_input_tokens}) must be < `max_total_tokens` ({self.max_total_tokens})"
                )
        if self.max_input_tokens is not None and self.max_batch_prefill_tokens is not None:
            if self.max_batch_prefill_tokens < self.max_input_tokens:
                raise ValueError(
                    f"`max_batch_prefill_tokens` ({self.max_batch_prefill_tokens}) must be >= `max_input_tokens` "
                    f"({self.max_input_tokens})"
                )
        # neuronx-tgi compiles for the MAX_* limits it serves: two values for one dimension cannot both hold.
        for export, export_env, limit, limit_env in (
            (self.export_batch_size, "HF_BATCH_SIZE", self.max_batch_size, "MAX_BATCH_SIZE"),
            (self.export_sequence_length, "HF_SEQUENCE_LENGTH", self.max_total_tokens, "MAX_TOTAL_TOKENS"),
        ):
            if export is not None and limit is not None and export != limit:
                raise ValueError(f"{export_env} ({export}) and {limit_env} ({limit}) must be equal: a Neuron model "
                                 "serves exactly the batch and sequence length it was compiled for")
        return self


def _env_values(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for setting, names in ENV_NAMES.items():
        for name in names:
            raw = environ.get(name)
            if raw not in (None, ""):
                values[setting] = [o.strip() for o in raw.split(",")] if setting == "cors_allow_origin" else raw
                break
    return values


def _describe(errors: list[dict]) -> str:
    lines = []
    for error in errors:
        setting = ".".join(str(p) for p in error["loc"])
        env = ENV_NAMES.get(setting)
        where = f"`{setting}`" + (f" (env {env[0]})" if env else "")
        message = error["msg"].removeprefix("Value error, ")
        lines.append(message if not setting else f"{where}: {message}")
    return "; ".join(lines)


# Settings that belong to a model: its static batch and the cores it was compiled for.
MODEL_SHAPE = ("max_batch_size", "max_input_tokens", "max_total_tokens", "max_batch_prefill_tokens", "cores_per_replica")


def load_config(args: Mapping[str, Any] | Config | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Defaults, overridden by `args` (serve_config.yaml), overridden by TGI environment variables.

    A model named in the environment replaces the args' model together with the shape the args give it:
    as with neuronx-tgi, its limits then come from the environment or from the model itself."""
    if isinstance(args, Config):
        args = args.model_dump(exclude_unset=True)
    values = {k: v for k, v in dict(args or {}).items() if v is not None}
    env = _env_values(os.environ if environ is None else environ)
    if "model_id" in env and env["model_id"] != values.get("model_id", TINY_MODEL_ID):
        for setting in MODEL_SHAPE:
            values.pop(setting, None)
    values.update(env)
    try:
        return Config.model_validate(values)
    except ValidationError as e:
        raise ConfigError(f"Invalid configuration: {_describe(e.errors())}") from None


@dataclass(frozen=True)
class Limits:
    """The token and batch limits a deployment runs with, settled against its model."""

    max_batch_size: int
    max_input_tokens: int
    max_total_tokens: int
    max_batch_prefill_tokens: int


def resolve_limits(
    config: Config,
    *,
    max_positions: int,
    compiled_batch_size: int | None = None,
    compiled_sequence_length: int | None = None,
) -> Limits:
    """Fill unset limits from the model and check them.

    `max_positions` is how many tokens the model can attend to. A compiled (Neuron) model also
    fixes its batch size and sequence length, and then neuronx-tgi's rules apply:
    max_batch_size == batch_size, max_total_tokens == sequence_length. Missing values are derived as
    neuronx-tgi does: max_input_tokens = max_total_tokens // 2, max_batch_prefill_tokens =
    batch_size * max_input_tokens (which it recommends, and does not require).
    """
    compiled = compiled_batch_size is not None
    batch_size = config.max_batch_size or compiled_batch_size or DEFAULT_BATCH_SIZE
    total = config.max_total_tokens or compiled_sequence_length or min(DEFAULT_MAX_TOTAL_TOKENS, max_positions)
    max_input = config.max_input_tokens or total // 2
    prefill = config.max_batch_prefill_tokens or batch_size * max_input

    if compiled and batch_size != compiled_batch_size:
        raise ConfigError(
            f"`max_batch_size` ({batch_size}) must be equal to the compiled model's batch_size ({compiled_batch_size})"
        )
    if compiled_sequence_length is not None and total != compiled_sequence_length:
        raise ConfigError(
            f"`max_total_tokens` ({total}) must be equal to the compiled model's sequence_length "
            f"({compiled_sequence_length})"
        )
    if total > max_positions:
        raise ConfigError(f"`max_total_tokens` ({total}) must be <= the model's maximum positions ({max_positions})")
    if max_input >= total:
        raise ConfigError(f"`max_input_tokens` ({max_input}) must be < `max_total_tokens` ({total})")
    if prefill < max_input:
        raise ConfigError(f"`max_batch_prefill_tokens` ({prefill}) must be >= `max_input_tokens` ({max_input})")
    return Limits(batch_size, max_input, total, prefill)
