"""What crosses the engine's boundary: a validated request in, token events out.

Plain dataclasses, picklable, so the same objects travel from the ingress to a batcher replica and
back. A request arrives already tokenized and validated; the engine never sees HTTP or raw JSON.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False  # False: greedy (argmax after the penalties)
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    typical_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    frequency_penalty: float = 0.0  # 0.0: off
    seed: int | None = None  # None: a random seed, reported back in `Finish.seed`
    top_n_tokens: int = 0  # alternatives reported with each generated token


@dataclass(frozen=True)
class StoppingParams:
    max_new_tokens: int
    stop_sequences: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    id: str
    input_ids: tuple[int, ...]  # the prompt, tokenized once by the ingress
    sampling: SamplingParams
    stopping: StoppingParams
    prompt_logprobs: bool = False  # TGI's `decoder_input_details`


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"


@dataclass
class Token:
    id: int
    text: str  # the text this token adds to the output ("" while a character is incomplete); a special token's own
    # text (`</s>`), which `generated_text` leaves out
    logprob: float  # NaN where there is none (the first prompt token)
    special: bool = False


@dataclass
class Finish:
    reason: FinishReason
    generated_text: str  # tokenizer.decode(generated ids but EOS, skip_special_tokens=True)
    generated_tokens: int
    seed: int | None  # the sampling seed, None for greedy
    queue_time: float  # seconds from submission to the prefill that took the request in (the ingress's
    # copy counts from its call to Serve, so that Serve's queue is in it too)
    inference_time: float  # seconds from that prefill to the last token


@dataclass
class TokenEvent:
    """One generated token of one request; the last one of a request carries `finish`."""

    request_id: str
    index: int  # 1 for the first generated token
    token: Token
    top_tokens: list[Token] = field(default_factory=list)
    prompt_tokens: list[Token] | None = None  # on the first event, when `prompt_logprobs` was asked
    finish: Finish | None = None


@dataclass
class ErrorEvent:
    """The request failed in the engine; nothing more comes for it."""

    request_id: str
    message: str
    error_type: str = "generation"


Event = TokenEvent | ErrorEvent


def is_last(event: Event) -> bool:
    return isinstance(event, ErrorEvent) or event.finish is not None
