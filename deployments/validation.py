"""TGI's request validation, in TGI's order and words, ending in an engine `GenerationRequest`.

Runs in the ingress, so a bad request never reaches a batcher replica; the prompt is tokenized here
once and its ids travel on. Each check raises `ValidationError` with the message TGI's router gives
(the HTTP layer adds TGI's `Input validation error: ` prefix). The chat template is rendered here too.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from neuron_serve.config import Config, Limits
from neuron_serve.errors import ServeError, ValidationError
from neuron_serve.request import GenerationRequest, SamplingParams, StoppingParams

from .schemas import ChatRequest, GenerateParameters, Message

# TGI schedules at most this many new tokens per round and validates the round's size, not the total.
DEFAULT_GENERATION_LENGTH = 1024


class TemplateError(ServeError):
    error_type = "template_error"


@dataclass
class ValidRequest:
    """A validated request: what the engine runs, and what the response needs to be built."""

    request: GenerationRequest
    inputs: str  # the prompt text as sent (for return_full_text)
    input_length: int  # prompt tokens, after truncation
    best_of: int
    details: bool
    decoder_input_details: bool
    return_full_text: bool
    top_n_tokens: int
    max_new_tokens: int  # what was asked (or derived), before the total-length cap
    validation_s: float = 0.0  # how long validating took, recorded once the request succeeds (as TGI)


# Text longer than this is tokenized off the event loop (see `TextGeneration`), with the tokenizer's batch call,
# which lets go of the GIL: a megabyte takes about a second, which every other stream of the ingress would wait.
OFF_LOOP_CHARS = 65536


def encode(tokenizer, text: str, add_special_tokens: bool):
    backend = tokenizer.backend_tokenizer
    if len(text) > OFF_LOOP_CHARS:
        return backend.encode_batch([text], add_special_tokens=add_special_tokens)[0]
    return backend.encode(text, add_special_tokens=add_special_tokens)


class Validator:
    def __init__(self, tokenizer, config: Config, limits: Limits):
        self.tokenizer = tokenizer
        self.config = config
        self.limits = limits

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            return encode(self.tokenizer, text, add_special_tokens).ids
        except Exception as e:
            raise ValidationError(f"tokenizer error {e}") from None

    def validate_best_of(self, best_of: int) -> None:
        if self.config.max_best_of == 1 and best_of != 1:
            raise ValidationError("`best_of` != 1 is not allowed for this endpoint")
        if best_of > self.config.max_best_of:
            raise ValidationError(f"`best_of` must be > 0 and <= {self.config.max_best_of}. Given: {best_of}")

    def validate(
        self,
        inputs: str,
        p: GenerateParameters,
        *,
        add_special_tokens: bool = True,
        return_full_text_default: bool = False,
    ) -> ValidRequest:
        best_of = 1 if p.best_of is None else p.best_of
        sampling = p.do_sample or any(v is not None for v in (p.temperature, p.top_k, p.top_p, p.typical_p))
        if best_of > 1 and not sampling:
            raise ValidationError("you must use sampling when `best_of` is > 1")
        temperature = 1.0 if p.temperature is None else p.temperature
        if temperature <= 0.0:
            raise ValidationError("`temperature` must be strictly positive")
        repetition_penalty = 1.0 if p.repetition_penalty is None else p.repetition_penalty
        if repetition_penalty <= 0.0:
            raise ValidationError("`repetition_penalty` must be strictly positive")
        frequency_penalty = 0.0 if p.frequency_penalty is None else p.frequency_penalty
        if not -2.0 <= frequency_penalty <= 2.0:
            raise ValidationError("`frequency_penalty` must be >= -2.0 and <= 2.0")
        if p.top_p is not None and not 0.0 < p.top_p < 1.0:
            raise ValidationError("`top_p` must be > 0.0 and < 1.0")
        top_p = 1.0 if p.top_p is None else p.top_p
        if p.typical_p is not None and not 0.0 < p.typical_p < 1.0:
            raise ValidationError("`typical_p` must be > 0.0 and < 1.0")
        typical_p = 1.0 if p.typical_p is None else p.typical_p
        if p.top_k is not None and p.top_k <= 0:
            raise ValidationError("`top_k` must be strictly positive")
        top_k = 0 if p.top_k is None else p.top_k
        if p.max_new_tokens == 0:
            raise ValidationError("`max_new_tokens` must be strictly positive")
        if len(p.stop) > self.config.max_stop_sequences:
            raise ValidationError(
                f"`stop` supports up to {self.config.max_stop_sequences} stop sequences. Given: {len(p.stop)}"
            )
        if p.seed is not None and best_of > 1:
            raise ValidationError("`seed` must not be set when `best_of` > 1")
        top_n_tokens = p.top_n_tokens or 0
        if top_n_tokens > self.config.max_top_n_tokens:
            raise ValidationError(
                f"`top_n_tokens` must be >= 0 and <= {self.config.max_top_n_tokens}. Given: {top_n_tokens}"
            )
        if not inputs:
            raise ValidationError("`inputs` cannot be empty")
        max_input = self.limits.max_input_tokens
        if p.truncate is not None and (p.truncate == 0 or p.truncate > max_input):
            raise ValidationError(f"`truncate` must be strictly positive and less than {max_input}. Given: {p.truncate}")

        input_ids = self.tokenize(inputs, add_special_tokens)
        if p.truncate is not None and len(input_ids) > p.truncate:
            input_ids = input_ids[-p.truncate :]
        input_length = len(input_ids)

        max_total = self.limits.max_total_tokens
        max_new_tokens = p.max_new_tokens if p.max_new_tokens is not None else max(0, max_total - input_length)
        round_tokens = min(max_new_tokens, DEFAULT_GENERATION_LENGTH)
        if input_length + round_tokens > max_total:
            raise ValidationError(
                f"`inputs` tokens + `max_new_tokens` must be <= {max_total}. "
                f"Given: {input_length} `inputs` tokens and {round_tokens} `max_new_tokens`"
            )
        if input_length > max_input:
            raise ValidationError(f"`inputs` must have less than {max_input} tokens. Given: {input_length}")
        if p.grammar is not None:
            raise ValidationError("grammar is not supported")

        # Sample when asked to, or when a warper would change the distribution (TGI's python server rule).
        do_sample = p.do_sample or temperature != 1.0 or top_k != 0 or top_p < 1.0 or typical_p < 1.0
        request = GenerationRequest(
            id=uuid.uuid4().hex,
            input_ids=tuple(input_ids),
            sampling=SamplingParams(
                do_sample=do_sample,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                typical_p=typical_p,
                repetition_penalty=repetition_penalty,
                frequency_penalty=frequency_penalty,
                seed=p.seed,
                top_n_tokens=top_n_tokens,
            ),
            stopping=StoppingParams(max_new_tokens=max(1, max_new_tokens), stop_sequences=tuple(p.stop)),
            prompt_logprobs=p.decoder_input_details,
        )
        return ValidRequest(
            request=request,
            inputs=inputs,
            input_length=input_length,
            best_of=max(best_of, 1),
            details=p.details or p.decoder_input_details,
            decoder_input_details=p.decoder_input_details,
            return_full_text=return_full_text_default if p.return_full_text is None else p.return_full_text,
            top_n_tokens=top_n_tokens,
            max_new_tokens=max_new_tokens,
        )

    # -- chat ---------------------------------------------------------------------------------------

    def render_chat(self, chat: ChatRequest) -> str:
        """The chat template applied to the messages, as TGI applies it: always with the generation
        prompt; when the last message is the assistant's, the text is cut after its content (trailing
        whitespace trimmed), for the model to continue it."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise TemplateError("Template error: template not found")
        messages = [{"role": m.role, "content": _message_text(m)} for m in chat.messages]
        try:
            # A batch of one conversation: transformers reads a bare list's first message to tell.
            text = self.tokenizer.apply_chat_template([messages], tokenize=False, add_generation_prompt=True)[0]
        except Exception as e:
            raise TemplateError(f"Template error: {e}") from None
        if messages and messages[-1]["role"] == "assistant":
            content = messages[-1]["content"]
            # The last occurrence, found forwards in the reversed text: `rfind` can take time quadratic in
            # the lengths (seconds for a megabyte of newlines that a template's `trim` took out).
            from_end = text[::-1].find(content[::-1])
            if from_end >= 0:
                text = text[: len(text) - from_end].rstrip()
        return text


def _message_text(message: Message) -> str:
    """What TGI renders of a message: its text, image chunks as markdown, tool calls as their JSON."""
    if message.content is None:  # then it has tool calls; their arguments as a JSON string, as TGI writes them
        calls = [{"id": c.id, "type": c.type, "function": {"description": c.function.description, "name": c.function.name,
                                                           "arguments": _json(c.function.arguments)}}
                 for c in message.tool_calls]
        return _json(calls)
    if isinstance(message.content, str):
        return message.content
    return "".join(c.text if c.type == "text" else f"![]({c.image_url.url})" for c in message.content)


def _json(value) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
