"""Engine events → the JSON each route family answers with, and the SSE framing of each.

One generation path feeds every route; only this module knows how TGI's `/generate`, its stream,
and the OpenAI chat and completion routes spell the same tokens. NaN log-probabilities (the first
prompt token has none) are written as JSON `null`, as serde does.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, AsyncGenerator

from neuron_serve.errors import IncompleteGenerationError, ServeError
from neuron_serve.request import ErrorEvent, Event, Finish, Token

from .validation import ValidRequest


def sse(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


DONE = sse("[DONE]")


def logprob(value: float) -> float | None:
    return None if value is None or math.isnan(value) else value


def token_json(token: Token) -> dict[str, Any]:
    return {"id": token.id, "text": token.text, "logprob": logprob(token.logprob), "special": token.special}


def prefill_json(token: Token) -> dict[str, Any]:
    return {"id": token.id, "text": token.text, "logprob": logprob(token.logprob)}


@dataclass
class Generated:
    """A finished generation, gathered from its events."""

    tokens: list[Token] = field(default_factory=list)
    top_tokens: list[list[Token]] = field(default_factory=list)
    prompt_tokens: list[Token] = field(default_factory=list)
    finish: Finish | None = None

    @property
    def mean_logprob(self) -> float:
        values = [t.logprob for t in self.tokens if not math.isnan(t.logprob)]
        return sum(values) / len(values) if values else float("-inf")


def raise_for(event: ErrorEvent) -> None:
    raise ServeError(event.message, event.error_type)


async def gather(handovers: AsyncGenerator[list[Event], None]) -> Generated:
    """The whole generation; the event source is closed on the way out, so that what it holds for the
    request (its inbox queue, its count in flight) goes at once, not when the generator is collected."""
    generated = Generated()
    async with contextlib.aclosing(handovers):
        async for events in handovers:
            for event in events:
                if isinstance(event, ErrorEvent):
                    raise_for(event)
                generated.tokens.append(event.token)
                generated.top_tokens.append(event.top_tokens)
                if event.prompt_tokens is not None:
                    generated.prompt_tokens = event.prompt_tokens
                if event.finish is not None:
                    generated.finish = event.finish
                    return generated
    raise IncompleteGenerationError("Incomplete generation")


# -- TGI -------------------------------------------------------------------------------------------


def full_text(valid: ValidRequest, text: str) -> str:
    return valid.inputs + text if valid.return_full_text else text


def _details(valid: ValidRequest, g: Generated) -> dict[str, Any]:
    out: dict[str, Any] = {
        "finish_reason": g.finish.reason.value,
        "generated_tokens": g.finish.generated_tokens,
        "seed": g.finish.seed,
        "prefill": [prefill_json(t) for t in g.prompt_tokens] if valid.decoder_input_details else [],
        "tokens": [token_json(t) for t in g.tokens],
    }
    if valid.top_n_tokens:
        out["top_tokens"] = [[token_json(t) for t in top] for top in g.top_tokens]
    return out


def generate_response(valid: ValidRequest, best: Generated, others: list[Generated] = ()) -> dict[str, Any]:
    body: dict[str, Any] = {"generated_text": full_text(valid, best.finish.generated_text)}
    if valid.details:
        details = _details(valid, best)
        if others:
            details["best_of_sequences"] = [
                {"generated_text": full_text(valid, g.finish.generated_text), **_details(valid, g)} for g in others
            ]
            # TGI's key order: best_of_sequences before top_tokens
            if "top_tokens" in details:
                details["top_tokens"] = details.pop("top_tokens")
        body["details"] = details
    return body


def stream_event(valid: ValidRequest, event) -> dict[str, Any]:
    out: dict[str, Any] = {"index": event.index, "token": token_json(event.token)}
    if event.top_tokens:
        out["top_tokens"] = [token_json(t) for t in event.top_tokens]
    finish = event.finish
    out["generated_text"] = full_text(valid, finish.generated_text) if finish else None
    out["details"] = (
        {
            "finish_reason": finish.reason.value,
            "generated_tokens": finish.generated_tokens,
            "seed": finish.seed,
            "input_length": valid.input_length,
        }
        if finish and valid.details
        else None
    )
    return out


def error_json(error_type: str, message: str) -> dict[str, str]:
    return {"error": message, "error_type": error_type}


# -- OpenAI ----------------------------------------------------------------------------------------

OPENAI_FINISH = {"eos_token": "stop", "length": "length", "stop_sequence": "stop_sequence"}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_logprobs(tokens: list[Token], tops: list[list[Token]]) -> dict[str, Any]:
    return {
        "content": [
            {"token": t.text, "logprob": logprob(t.logprob),
             "top_logprobs": [{"token": o.text, "logprob": logprob(o.logprob)} for o in top]}
            for t, top in zip(tokens, tops)
        ]
    }


@dataclass
class OpenAIContext:
    model: str
    system_fingerprint: str
    logprobs: bool = False
    include_usage: bool = False

    def header(self, kind: str) -> dict[str, Any]:
        return {"object": kind, "id": "", "created": int(time.time()), "model": self.model,
                "system_fingerprint": self.system_fingerprint}


def chat_completion(ctx: OpenAIContext, valid: ValidRequest, g: Generated) -> dict[str, Any]:
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": g.finish.generated_text},
        "logprobs": chat_logprobs(g.tokens, g.top_tokens) if ctx.logprobs else None,
        "finish_reason": OPENAI_FINISH[g.finish.reason.value],
    }
    return {**ctx.header("chat.completion"), "choices": [choice],
            "usage": usage(valid.input_length, g.finish.generated_tokens)}


def chat_chunk(ctx: OpenAIContext, event) -> dict[str, Any]:
    choice = {
        "index": 0,
        "delta": {"role": "assistant", "content": "" if event.token.special else event.token.text},  # as TGI
        "logprobs": chat_logprobs([event.token], [event.top_tokens]) if ctx.logprobs else None,
        "finish_reason": OPENAI_FINISH[event.finish.reason.value] if event.finish else None,
    }
    return {**ctx.header("chat.completion.chunk"), "choices": [choice], "usage": None}


def chat_usage_chunk(ctx: OpenAIContext, valid: ValidRequest, finish: Finish) -> dict[str, Any]:
    return {**ctx.header("chat.completion.chunk"), "choices": [],
            "usage": usage(valid.input_length, finish.generated_tokens)}


def completion(ctx: OpenAIContext, results: list[tuple[int, ValidRequest, Generated]]) -> dict[str, Any]:
    choices = [
        {"index": i, "text": g.finish.generated_text, "logprobs": None,
         "finish_reason": OPENAI_FINISH[g.finish.reason.value]}
        for i, _, g in results
    ]
    prompt = sum(v.input_length for _, v, _ in results)
    generated = sum(g.finish.generated_tokens for _, _, g in results)
    return {**ctx.header("text_completion"), "choices": choices, "usage": usage(prompt, generated)}


def completion_chunk(ctx: OpenAIContext, index: int, valid: ValidRequest, event) -> dict[str, Any]:
    finish = event.finish
    choice = {"index": index, "text": event.token.text, "logprobs": None,
              "finish_reason": finish.reason.value if finish else ""}
    head = ctx.header("text_completion")
    if finish is None:
        return {"object": head["object"], "id": "", "created": head["created"], "choices": [choice],
                "model": ctx.model, "system_fingerprint": ctx.system_fingerprint}
    return {**head, "choices": [choice], "usage": usage(valid.input_length, finish.generated_tokens)}


def openai_stream_error(message: str) -> bytes:
    return sse({"error": {"message": message, "http_status_code": 422}})
