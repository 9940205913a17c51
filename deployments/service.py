"""The one generation path behind every route: permit → validate → run on a batcher → shape the answer.

`TextGeneration` knows nothing of Ray: it is given an `EventSource` (batcher replicas, called through a
Serve handle, their events read from the ingress's inbox) and returns plain JSON-able dicts or SSE byte
chunks, one chunk per hand-over of tokens.
Routes only translate their body into `GenerateParameters` and call one of the methods here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, replace
from typing import AsyncGenerator, AsyncIterator, Protocol

from neuron_serve.config import Config, Limits
from neuron_serve.errors import (
    BatchSizeError, IncompleteGenerationError, OverloadedError, ServeError, SuffixError, ToolError, ValidationError,
)
from neuron_serve.request import Event, GenerationRequest, TokenEvent

from . import responses as R
from .ray_env import REQUEST_LINE
from .schemas import ChatRequest, CompletionRequest, GenerateParameters, GenerateRequest
from .validation import OFF_LOOP_CHARS, ValidRequest, Validator, encode


logger = logging.getLogger("ray.serve")


class EventSource(Protocol):
    def stream(self, request: GenerationRequest) -> AsyncGenerator[list[Event], None]:
        """The request's events in order, in the lists they were handed over in (each becomes one HTTP
        chunk on the streaming routes), ending with a finished `TokenEvent` or an `ErrorEvent`; closing
        it early stops the request."""
        ...


class RequestMetrics(Protocol):
    def received(self) -> None: ...
    def validated(self, input_length: int, max_new_tokens: int) -> None: ...
    def succeeded(self, total: float, validation: float, queue: float, inference: float, generated_tokens: int) -> None: ...
    def failed(self, err: str) -> None: ...


class NoMetrics:
    def received(self) -> None: ...
    def validated(self, input_length: int, max_new_tokens: int) -> None: ...
    def succeeded(self, total: float, validation: float, queue: float, inference: float, generated_tokens: int) -> None: ...
    def failed(self, err: str) -> None: ...


# `tgi_request_failure{err}` labels, by error type.
FAILURE_LABEL = {
    "validation": "validation",
    "overloaded": "overloaded",
    "generation": "generation",
    "incomplete_generation": "incomplete",
    "incomplete_generation_stream": "incomplete",
    "template_error": "template",
    "suffix not supported": "validation",
    "tool_error": "validation",
    "batch size exceeded": "validation",
}


def _failure_label(error: ServeError) -> str:
    return FAILURE_LABEL.get(error.error_type, error.error_type.replace(" ", "_"))


def error_message(error: ServeError) -> str:
    """TGI's wording: validation errors carry a prefix, the others speak for themselves."""
    if error.error_type == "validation":
        return f"Input validation error: {error.message}"
    return error.message


class Permits:
    """At most `limit` sequences in flight in this ingress; beyond that, 429 at once (never queued). As in
    TGI, a `best_of` request takes one per sequence."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_use = 0

    @contextlib.contextmanager
    def take(self, sequences: int = 1):
        if self.in_use + sequences > self.limit:
            raise OverloadedError("Model is overloaded")
        self.in_use += sequences
        try:
            yield
        finally:
            self.in_use -= sequences


@dataclass
class Timings:
    """What the x-* headers report, in seconds."""

    start: float
    validated: float = 0.0
    queue: float = 0.0
    inference: float = 0.0
    generated_tokens: int = 0
    input_length: int = 0
    characters: int = 0

    def headers(self, compute_type: str) -> dict[str, str]:
        total = time.monotonic() - self.start
        per_token = self.inference / self.generated_tokens if self.generated_tokens else 0.0
        ms = lambda s: str(int(s * 1000))  # noqa: E731
        return {
            "x-compute-type": compute_type,
            "x-compute-time": f"{total:.9f}",
            "x-compute-characters": str(self.characters),
            "x-total-time": ms(total),
            "x-validation-time": ms(self.validated - self.start),
            "x-queue-time": ms(self.queue),
            "x-inference-time": ms(self.inference),
            "x-time-per-token": ms(per_token),
            "x-prompt-tokens": str(self.input_length),
            "x-generated-tokens": str(self.generated_tokens),
        }


class TextGeneration:
    def __init__(self, config: Config, limits: Limits, tokenizer, source: EventSource, model_id: str,
                 compute_type: str, metrics: RequestMetrics | None = None):
        self.metrics = metrics or NoMetrics()
        self.config = config
        self.limits = limits
        self.tokenizer = tokenizer
        self.source = source
        self.validator = Validator(tokenizer, config, limits)
        self.permits = Permits(config.max_concurrent_requests)
        self.model_id = model_id
        self.compute_type = compute_type
        from neuron_serve import __version__

        self.version = __version__
        self.system_fingerprint = f"{__version__}-native"

    @contextlib.contextmanager
    def _accounted(self):
        """Count one request; it ends as exactly one success (recorded by `_succeeded`) or one failure."""
        self.metrics.received()
        try:
            yield
        except ServeError as e:
            self.metrics.failed(_failure_label(e))
            raise
        except (asyncio.CancelledError, GeneratorExit):
            self.metrics.failed("dropped")
            raise
        except Exception:
            self.metrics.failed("internal")
            raise

    def _refused(self, error: ServeError) -> ServeError:
        """`error`, counted as one request that failed before it started."""
        self.metrics.received()
        self.metrics.failed(_failure_label(error))
        return error

    async def _validate(self, inputs: str, params: GenerateParameters, **kwargs) -> ValidRequest:
        started = time.monotonic()
        valid = await _off_loop_if_long(inputs, self.validator.validate, inputs, params, **kwargs)
        valid.validation_s = time.monotonic() - started
        self.metrics.validated(valid.input_length, valid.max_new_tokens)
        if self.config.log_prompts:  # a debug setting: prompts are never logged otherwise
            logger.info("request %s prompt=%r", valid.request.id, inputs, extra=REQUEST_LINE)
        return valid

    def _succeeded(self, started: float, valid: ValidRequest, g: R.Generated) -> None:
        f = g.finish
        self.metrics.succeeded(time.monotonic() - started, valid.validation_s, f.queue_time, f.inference_time,
                               f.generated_tokens)

    async def _tokens(self, valid: ValidRequest, started: float) -> AsyncIterator[list[TokenEvent]]:
        """The request's token events up to its last one, as handed over, for the streaming routes: a
        failure raises its `ServeError` after the tokens before it, the success is counted as the last
        token passes, and a stream that ends without a last token is an incomplete generation."""
        async with contextlib.aclosing(self.source.stream(valid.request)) as handovers:
            async for events in handovers:
                tokens = [e for e in events if isinstance(e, TokenEvent)]
                last = tokens[-1].finish if tokens else None
                if last is not None:
                    self._succeeded(started, valid, R.Generated(finish=last))
                if tokens:
                    yield tokens
                if len(tokens) < len(events):  # an error event ends a hand-over
                    R.raise_for(events[-1])
                if last is not None:
                    return
        raise IncompleteGenerationError("Incomplete generation stream", "incomplete_generation_stream")

    # -- TGI ---------------------------------------------------------------------------------------

    async def generate(self, body: GenerateRequest, return_full_text_default: bool = False) -> tuple[dict, dict[str, str]]:
        timings = Timings(time.monotonic(), characters=len(body.inputs))
        with self._accounted():
            best_of = body.parameters.best_of
            sequences = best_of if best_of is not None and best_of > 1 else 1
            if sequences > 1:
                self.validator.validate_best_of(best_of)
            with self.permits.take(sequences):
                valid = await self._validate(body.inputs, body.parameters, return_full_text_default=return_full_text_default)
                timings.validated = time.monotonic()
                runs = await _all(R.gather(self.source.stream(r)) for r in self._best_of_requests(valid))
            best = max(runs, key=lambda g: g.mean_logprob)
            self._succeeded(timings.start, valid, best)
        others = [g for g in runs if g is not best]
        self._finish_timings(timings, valid, best)
        return R.generate_response(valid, best, others), timings.headers(self.compute_type)

    def _best_of_requests(self, valid: ValidRequest) -> list[GenerationRequest]:
        if valid.best_of == 1:
            return [valid.request]
        # Each sequence samples with its own random seed (`seed` with best_of > 1 was refused).
        return [replace(valid.request, id=uuid.uuid4().hex) for _ in range(valid.best_of)]

    @staticmethod
    def _finish_timings(timings: Timings, valid: ValidRequest, g: R.Generated) -> None:
        timings.queue = g.finish.queue_time
        timings.inference = g.finish.inference_time
        timings.generated_tokens = g.finish.generated_tokens
        timings.input_length = valid.input_length

    async def generate_stream(self, body: GenerateRequest, return_full_text_default: bool = False) -> AsyncIterator[bytes]:
        """TGI's stream: errors, validation ones included, arrive as one event on an HTTP 200."""
        started = time.monotonic()
        try:
            with self._accounted():
                p = body.parameters
                if (1 if p.best_of is None else p.best_of) != 1:
                    raise ValidationError("`best_of` != 1 is not supported when streaming tokens")
                if p.decoder_input_details:
                    raise ValidationError("`decoder_input_details` == true is not supported when streaming tokens")
                with self.permits.take():
                    valid = await self._validate(body.inputs, p, return_full_text_default=return_full_text_default)
                    async with contextlib.aclosing(self._tokens(valid, started)) as handovers:
                        async for tokens in handovers:
                            yield b"".join(R.sse(R.stream_event(valid, event)) for event in tokens)
        except ServeError as e:
            yield R.sse(R.error_json(e.error_type, error_message(e)))

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[dict]:
        """Tokens with byte offsets into `text`, as TGI's /tokenize reports them."""
        return await _off_loop_if_long(text, self._tokens_with_offsets, text, add_special_tokens)

    def _tokens_with_offsets(self, text: str, add_special_tokens: bool) -> list[dict]:
        encoding = encode(self.tokenizer, text, add_special_tokens)
        data = text.encode()
        byte_at = _char_to_byte_offsets(text)
        out = []
        for token_id, (start, stop), special in zip(encoding.ids, encoding.offsets, encoding.special_tokens_mask):
            if special:
                out.append({"id": token_id, "text": "", "start": 0, "stop": 0})
                continue
            b0, b1 = byte_at[start], byte_at[stop]
            out.append({"id": token_id, "text": data[b0:b1].decode(errors="replace"), "start": b0, "stop": b1})
        return out

    # -- OpenAI ------------------------------------------------------------------------------------

    def _openai_context(self, model: str | None, logprobs: bool = False, include_usage: bool = False) -> R.OpenAIContext:
        name = model if model and model != "tgi" else self.model_id
        return R.OpenAIContext(name, self.system_fingerprint, logprobs, include_usage)

    def chat_prompt(self, chat: ChatRequest) -> str:
        """The prompt TGI would build: tools are refused (they need a grammar), unless `tool_choice` is
        "none", which TGI serves as a plain chat."""
        if chat.tools is not None and chat.response_format is not None:
            raise ToolError("Tool error: Grammar and tools are mutually exclusive")
        if chat.tools and chat.tool_choice != "none":
            raise ToolError("Tool error: tool calls need grammar support, which this server does not have")
        return self.validator.render_chat(chat)

    def chat_stream_prompt(self, chat: ChatRequest) -> str:
        """`chat_prompt` before a chat stream starts: a refusal is the request's HTTP error, and counts
        as one failed request (inside `chat`, the request's own accounting counts it)."""
        try:
            return self.chat_prompt(chat)
        except ServeError as e:
            raise self._refused(e) from None

    @staticmethod
    def chat_parameters(chat: ChatRequest) -> GenerateParameters:
        return GenerateParameters(
            **_openai_sampling(chat.temperature),
            top_p=chat.top_p,
            # TGI's mapping: presence_penalty in [-2, 2] becomes a repetition penalty in [0, 4].
            repetition_penalty=None if chat.presence_penalty is None else chat.presence_penalty + 2.0,
            frequency_penalty=chat.frequency_penalty,
            max_new_tokens=chat.max_completion_tokens if chat.max_completion_tokens is not None else chat.max_tokens,
            stop=chat.stop or [],
            seed=chat.seed,
            top_n_tokens=chat.top_logprobs,
            details=True,
            grammar=chat.response_format,
        )

    async def chat(self, chat: ChatRequest) -> tuple[dict, dict[str, str]]:
        timings = Timings(time.monotonic())
        with self._accounted():
            prompt = self.chat_prompt(chat)
            timings.characters = len(prompt)
            ctx = self._openai_context(chat.model, logprobs=bool(chat.logprobs))
            with self.permits.take():
                valid = await self._validate(prompt, self.chat_parameters(chat), add_special_tokens=False)
                timings.validated = time.monotonic()
                generated = await R.gather(self.source.stream(valid.request))
            self._succeeded(timings.start, valid, generated)
        self._finish_timings(timings, valid, generated)
        return R.chat_completion(ctx, valid, generated), timings.headers(self.compute_type)

    async def chat_stream(self, chat: ChatRequest, prompt: str) -> AsyncIterator[bytes]:
        """Chat chunks, then `data: [DONE]`; an error is one OpenAI-style event before [DONE].

        `prompt` is `chat_prompt(chat)`, rendered before the stream starts: template and tool errors
        are real HTTP errors, as in TGI.
        """
        ctx = self._openai_context(chat.model, bool(chat.logprobs), bool(chat.stream_options and chat.stream_options.include_usage))
        started = time.monotonic()
        try:
            with self._accounted():
                with self.permits.take():
                    valid = await self._validate(prompt, self.chat_parameters(chat), add_special_tokens=False)
                    async with contextlib.aclosing(self._tokens(valid, started)) as handovers:
                        async for tokens in handovers:
                            chunk = b"".join(R.sse(R.chat_chunk(ctx, event)) for event in tokens)
                            if tokens[-1].finish is not None and ctx.include_usage:
                                chunk += R.sse(R.chat_usage_chunk(ctx, valid, tokens[-1].finish))
                            yield chunk
        except ServeError as e:
            yield R.openai_stream_error(error_message(e))
        yield R.DONE

    def completion_prompts(self, body: CompletionRequest) -> list[str]:
        """The prompts of a completions request, refused as TGI's handler refuses them (before any
        stream starts, so a refusal is a real HTTP error): a suffix, or more than max_client_batch_size.
        A refusal counts as one failed request."""
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if body.suffix is not None:
            raise self._refused(SuffixError("Suffix is not supported and can be achieved by preprocessing the prompt."))
        if len(prompts) > self.config.max_client_batch_size:
            raise self._refused(BatchSizeError(
                f"Number of prompts exceeds the maximum allowed batch size of {self.config.max_client_batch_size}"))
        return prompts

    @staticmethod
    def completion_parameters(body: CompletionRequest) -> GenerateParameters:
        return GenerateParameters(
            **_openai_sampling(body.temperature),
            top_p=body.top_p,
            repetition_penalty=body.repetition_penalty,
            frequency_penalty=body.frequency_penalty,
            max_new_tokens=body.max_tokens,
            stop=body.stop or [],
            seed=body.seed,
            details=True,
        )

    async def completions(self, body: CompletionRequest, prompts: list[str]) -> tuple[dict, dict[str, str]]:
        """Every prompt as a request of its own; the x-* headers are the sums of theirs, as in TGI."""
        params = self.completion_parameters(body)

        async def one(index: int, prompt: str):
            timings = Timings(time.monotonic(), characters=len(prompt))
            with self._accounted(), self.permits.take():
                valid = await self._validate(prompt, params)
                timings.validated = time.monotonic()
                generated = await R.gather(self.source.stream(valid.request))
                self._succeeded(timings.start, valid, generated)
            self._finish_timings(timings, valid, generated)
            return (index, valid, generated), timings.headers(self.compute_type)

        done = await _all(one(i, p) for i, p in enumerate(prompts))
        headers = _summed_headers([h for _, h in done])
        return R.completion(self._openai_context(None), [r for r, _ in done]), headers

    async def completions_stream(self, body: CompletionRequest, prompts: list[str]) -> AsyncIterator[bytes]:
        """Chunks of every prompt (`completion_prompts(body)`), interleaved as they come; then `data: [DONE]`."""
        ctx = self._openai_context(None)
        params = self.completion_parameters(body)
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()

        async def one(index: int, prompt: str) -> None:
            started = time.monotonic()
            try:
                with self._accounted(), self.permits.take():
                    valid = await self._validate(prompt, params)
                    async with contextlib.aclosing(self._tokens(valid, started)) as handovers:
                        async for tokens in handovers:
                            await queue.put(b"".join(R.sse(R.completion_chunk(ctx, index, valid, e)) for e in tokens))
            except ServeError as e:
                await queue.put(R.openai_stream_error(error_message(e)))
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(one(i, p)) for i, p in enumerate(prompts)]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                else:
                    yield item
            yield R.DONE
        finally:
            for task in tasks:
                task.cancel()


async def _off_loop_if_long(text: str, work, *args, **kwargs):
    """`work(*args, **kwargs)`, in a worker thread when `text` is long: this ingress's other streams go on
    meanwhile (the tokenizer lets go of the GIL; Python's own work yields it every few milliseconds)."""
    if len(text) > OFF_LOOP_CHARS:
        return await asyncio.to_thread(work, *args, **kwargs)
    return work(*args, **kwargs)


async def _all(coroutines) -> list:
    """Their results in order, or the first failure, which cancels the others (`asyncio.gather` would
    let them run on: rows and permits held for an answer nobody reads)."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


def _openai_sampling(temperature: float | None) -> dict:
    """OpenAI routes sample unless `temperature` is 0, which means greedy (as in TGI)."""
    greedy = temperature is not None and temperature == 0.0
    return {"do_sample": not greedy, "temperature": None if greedy else temperature}


def _summed_headers(each: list[dict[str, str]]) -> dict[str, str]:
    """One response's x-* headers for several generations, as TGI's completions handler adds them up:
    integer headers summed, the compute type kept; x-compute-time (seconds, not an integer) left out."""
    summed = {"x-compute-type": each[0]["x-compute-type"]}
    for name in each[0]:
        if name not in summed and name != "x-compute-time":
            summed[name] = str(sum(int(h[name]) for h in each))
    return summed


def _char_to_byte_offsets(text: str) -> list[int]:
    offsets = [0]
    for ch in text:
        offsets.append(offsets[-1] + len(ch.encode()))
    return offsets

