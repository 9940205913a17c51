"""The static batch: a fixed list of rows, each empty or holding one request's `Slot`.

A slot is everything the engine keeps for one request while it generates: its row in the KV cache,
its token ids (prompt, then generated), its sampler, stop condition and detokenizer. One object per
row, rather than parallel lists zipped together.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .detokenizer import IncrementalDetokenizer
from .request import GenerationRequest
from .sampler import RequestSampler
from .stopping import StopCondition


@dataclass
class Slot:
    row: int
    request: GenerationRequest
    sampler: RequestSampler
    stop: StopCondition
    detokenizer: IncrementalDetokenizer
    submitted_at: float  # time.monotonic() when the engine received the request
    admitted_at: float = field(default_factory=time.monotonic)  # when the prefill that took it in began
    token_ids: list[int] = field(default_factory=list)  # prompt + generated; the last one is not in the KV cache yet
    generated: int = 0

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.request.input_ids)

    @property
    def id(self) -> str:
        return self.request.id

    @property
    def next_position(self) -> int:
        """The position of the last token, which the next decode step feeds to the model."""
        return len(self.token_ids) - 1


class StaticBatch:
    def __init__(self, size: int):
        self.slots: list[Slot | None] = [None] * size

    @property
    def size(self) -> int:
        return len(self.slots)

    def free_rows(self) -> list[int]:
        return [row for row, slot in enumerate(self.slots) if slot is None]

    def active(self) -> list[Slot]:
        return [slot for slot in self.slots if slot is not None]

    def find(self, request_id: str) -> Slot | None:
        return next((s for s in self.slots if s is not None and s.id == request_id), None)

    def insert(self, slot: Slot) -> None:
        if self.slots[slot.row] is not None:
            raise RuntimeError(f"row {slot.row} is already taken by request {self.slots[slot.row].id}")
        self.slots[slot.row] = slot

    def release(self, slot: Slot) -> None:
        if self.slots[slot.row] is slot:
            self.slots[slot.row] = None
