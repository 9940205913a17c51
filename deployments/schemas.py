"""The HTTP bodies, as pydantic v2 models matching TGI's OpenAPI field by field.

Requests are parsed strictly, as TGI's serde does: a string is not a number, `20.0` is not an
integer, `null` is refused where TGI's field is not optional, integers stay within their Rust
widths, and unknown keys are ignored. Responses are built by `responses.py`; these models document
them in `/api-doc/openapi.json`, and the tests check every response against them.
"""

from __future__ import annotations

import struct
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

U32 = Annotated[int, Field(ge=0, le=2**32 - 1)]
U64 = Annotated[int, Field(ge=0, le=2**64 - 1)]
USIZE = Annotated[int, Field(ge=0, le=2**64 - 1)]
I32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]


def _as_float32(value: float) -> float:
    """The value as Rust's f32 holds it, which TGI then validates: 1e-46 is 0.0, 0.99999999 is 1.0."""
    return struct.unpack("f", struct.pack("f", value))[0]


F32 = Annotated[float, Field(allow_inf_nan=False, ge=-3.4e38, le=3.4e38), AfterValidator(_as_float32)]


class Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


def _serde_error(message: str) -> PydanticCustomError:
    """A custom check's refusal, worded as serde words it (pydantic would prefix "Value error, ")."""
    return PydanticCustomError("value_error", message)


class Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- TGI -------------------------------------------------------------------------------------------


class Grammar(Request):
    type: Literal["json", "json_object", "regex", "json_schema"]
    value: Any


class GenerateParameters(Request):
    best_of: USIZE | None = Field(None, description="Generate best_of sequences and return the one with the highest mean token logprob")
    temperature: F32 | None = None
    repetition_penalty: F32 | None = None
    frequency_penalty: F32 | None = None
    top_k: I32 | None = None
    top_p: F32 | None = None
    typical_p: F32 | None = None
    do_sample: bool = False
    max_new_tokens: U32 | None = Field(None, description="null: up to max_total_tokens - input tokens")
    return_full_text: bool | None = None
    stop: list[str] = Field(default_factory=list)
    truncate: USIZE | None = None
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    seed: U64 | None = None
    top_n_tokens: U32 | None = None
    grammar: Grammar | None = None
    adapter_id: str | None = None


def _default_parameters() -> GenerateParameters:
    # TGI's quirk, kept for compatibility: a body without `parameters` samples.
    return GenerateParameters(do_sample=True)


class GenerateRequest(Request):
    inputs: str
    parameters: GenerateParameters = Field(default_factory=_default_parameters)


class CompatGenerateRequest(GenerateRequest):
    stream: bool = False


class Token(Response):
    id: int
    text: str
    logprob: float | None
    special: bool


class PrefillToken(Response):
    id: int
    text: str
    logprob: float | None


class BestOfSequence(Response):
    generated_text: str
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = None


class Details(Response):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]
    best_of_sequences: list[BestOfSequence] | None = None
    top_tokens: list[list[Token]] | None = None


class GenerateResponse(Response):
    generated_text: str
    details: Details | None = None


class StreamDetails(Response):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None
    input_length: int


class StreamResponse(Response):
    index: int
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None
    details: StreamDetails | None


class ErrorResponse(Response):
    error: str
    error_type: str


class Info(Response):
    model_id: str
    model_sha: str | None
    model_pipeline_tag: str | None
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    validation_workers: int
    max_client_batch_size: int
    router: str
    version: str
    sha: str | None
    docker_label: str | None
    # Read by older clients.
    max_input_length: int
    max_batch_total_tokens: int
    max_batch_size: int
    model_dtype: str
    model_device_type: str
    # neuron-serve's own: the static batch and the replicas that run it.
    max_batch_prefill_tokens: int
    insertion: str
    backend: str
    replicas: list[dict[str, Any]]


class SimpleToken(Response):
    id: int
    text: str
    start: int
    stop: int


# -- OpenAI ----------------------------------------------------------------------------------------


class TextChunk(Request):
    type: Literal["text"]
    text: str


class ImageUrl(Request):
    url: str


class ImageChunk(Request):
    type: Literal["image_url"]
    image_url: ImageUrl


class FunctionCall(Request):
    description: str | None = None
    name: str
    arguments: Any = Field(validation_alias=AliasChoices("arguments", "parameters"))


class ToolCall(Request):
    id: str
    type: str
    function: FunctionCall


class Message(Request):
    """TGI's message: a role with either `content` (text or chunks) or `tool_calls`."""

    role: str
    content: str | list[TextChunk | ImageChunk] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None

    @model_validator(mode="after")
    def _has_a_body(self) -> Message:
        if self.content is None and self.tool_calls is None:
            raise _serde_error("data did not match any variant of untagged enum MessageBody")
        return self


class StreamOptions(Request):
    include_usage: bool = False


class ChatRequest(Request):
    model: str | None = None
    messages: list[Message]
    frequency_penalty: F32 | None = None
    logit_bias: list[F32] | None = None
    logprobs: bool | None = None
    top_logprobs: U32 | None = None
    max_tokens: U32 | None = None
    max_completion_tokens: U32 | None = None
    n: U32 | None = None
    presence_penalty: F32 | None = None
    stop: list[str] | None = None
    stream: bool = False
    seed: U64 | None = None
    temperature: F32 | None = None
    top_p: F32 | None = None
    tools: list[dict[str, Any]] | None = None
    tool_prompt: str | None = None
    tool_choice: Any = None
    response_format: Grammar | None = None
    stream_options: StreamOptions | None = None


class CompletionRequest(Request):
    model: str | None = None
    prompt: str | list[str]
    max_tokens: U32 | None = None
    temperature: F32 | None = None
    top_p: F32 | None = None
    stream: bool = False
    seed: U64 | None = None
    suffix: str | None = None
    repetition_penalty: F32 | None = None
    frequency_penalty: F32 | None = None
    stop: list[str] | None = None

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt: str | list[str]) -> str | list[str]:
        if prompt == []:  # TGI's `Prompt` refuses it while the body is read: a body error, not a request
            raise _serde_error("Empty array detected. Do not use an empty array for the prompt.")
        return prompt


class Usage(Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(Response):
    token: str
    logprob: float | None


class ChatLogprob(Response):
    token: str
    logprob: float | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Response):
    content: list[ChatLogprob]


class OutputMessage(Response):
    role: Literal["assistant"]
    content: str


class ChatChoice(Response):
    index: int
    message: OutputMessage
    logprobs: ChatLogprobs | None
    finish_reason: str


class ChatCompletion(Response):
    object: Literal["chat.completion"]
    id: str
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(Response):
    role: Literal["assistant"]
    content: str


class ChatChunkChoice(Response):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(Response):
    object: Literal["chat.completion.chunk"]
    id: str
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None


class CompletionChoice(Response):
    index: int
    text: str
    logprobs: None
    finish_reason: str


class Completion(Response):
    object: Literal["text_completion"]
    id: str
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(Response):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(Response):
    object: Literal["list"]
    data: list[ModelCard]


class ChatTokenizeResponse(Response):
    tokenize_response: list[SimpleToken]
    templated_text: str
