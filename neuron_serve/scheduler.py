"""Each step, decide: prefill waiting requests into free rows, or decode one token for every active row.

The decision is a plain `StepPlan`, built fresh each step; the engine carries it out. Two small
policies shape it:

- `PrefillPolicy`, when to interrupt decoding for a prefill (TGI's router knobs): always when the
  batch is empty; otherwise once `waiting_served_ratio x running` requests can be inserted, or once
  a request has waited `max_waiting_tokens` decode steps.
- `InsertionPolicy`, which rows a prefill writes: `insert` only the new ones (their rows' KV cache is
  written, the others' is untouched); `rebuild` also re-prefills every active row from its token ids,
  as the seed neuronx-tgi image did, and as a whole-batch compiled Neuron model requires. A row
  longer than a prefill takes (the compiled `max_context_length`) cannot be rebuilt: new requests
  wait until it ends.

New requests are admitted first come, first served, while rows are free and their prompts fit in
`max_batch_prefill_tokens`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from .batch import Slot, StaticBatch
from .request import GenerationRequest


@dataclass
class WaitingRequest:
    request: GenerationRequest
    submitted_at: float  # time.monotonic()


@dataclass
class StepPlan:
    # New requests to prefill, each with the free row it goes to.
    admit: list[tuple[WaitingRequest, int]] = field(default_factory=list)
    # Active slots whose KV cache the same prefill rebuilds (the `rebuild` policy); their logits are dropped.
    rebuild: list[Slot] = field(default_factory=list)
    # Active slots that get one token this step (empty on a prefill step).
    decode: list[Slot] = field(default_factory=list)
    # Why a prefill joins a running batch, in TGI's words (`tgi_batch_concat{reason}`): enough requests
    # wait (`backpressure`), or one has waited `max_waiting_tokens` steps (`wait_exceeded`). None otherwise.
    concat: str | None = None

    @property
    def is_prefill(self) -> bool:
        return bool(self.admit)

    @property
    def is_empty(self) -> bool:
        return not self.admit and not self.decode


@dataclass(frozen=True)
class PrefillPolicy:
    waiting_served_ratio: float = 0.0
    max_waiting_tokens: int = 20

    def should_prefill(self, insertable: int, running: int, steps_since_prefill: int) -> bool:
        if insertable == 0:
            return False
        if running == 0 or self.wait_exceeded(steps_since_prefill):
            return True
        return insertable >= self.waiting_served_ratio * running

    def wait_exceeded(self, steps_since_prefill: int) -> bool:
        return steps_since_prefill >= self.max_waiting_tokens


@dataclass(frozen=True)
class InsertionPolicy:
    name: Literal["insert", "rebuild"] = "insert"

    def rows_to_rebuild(self, active: list[Slot]) -> list[Slot]:
        return list(active) if self.name == "rebuild" else []


class Scheduler:
    def __init__(self, prefill_policy: PrefillPolicy, insertion: InsertionPolicy, max_batch_prefill_tokens: int,
                 max_prefill_tokens: int):
        self.prefill_policy = prefill_policy
        self.insertion = insertion
        self.max_batch_prefill_tokens = max_batch_prefill_tokens
        self.max_prefill_tokens = max_prefill_tokens  # the longest row a prefill takes (`Backend`)
        self.steps_since_prefill = 0

    def schedule(self, waiting: deque[WaitingRequest], batch: StaticBatch) -> StepPlan:
        """Plan one step; admitted requests are taken off `waiting`."""
        active = batch.active()
        free = batch.free_rows()
        insertable = min(len(waiting), len(free))
        if self.prefill_policy.should_prefill(insertable, len(active), self.steps_since_prefill):
            rebuild = self.insertion.rows_to_rebuild(active)
            if self._fits(rebuild):
                concat = None
                if active:
                    concat = "wait_exceeded" if self.prefill_policy.wait_exceeded(self.steps_since_prefill) else "backpressure"
                self.steps_since_prefill = 0
                return StepPlan(admit=self._admit(waiting, free), rebuild=rebuild, concat=concat)
        if active:
            self.steps_since_prefill += 1
            return StepPlan(decode=active)
        return StepPlan()

    def _fits(self, rebuild: list[Slot]) -> bool:
        """Whether a prefill can rebuild these rows (all but each one's pending token). A whole-batch Neuron
        model compiled with `max_context_length` < `sequence_length` cannot rebuild a row grown past it:
        new requests then wait until such rows end, rather than fail with the batch."""
        return all(len(slot.token_ids) - 1 <= self.max_prefill_tokens for slot in rebuild)

    def _admit(self, waiting: deque[WaitingRequest], free_rows: list[int]) -> list[tuple[WaitingRequest, int]]:
        admitted: list[tuple[WaitingRequest, int]] = []
        tokens = 0
        for row in free_rows:
            if not waiting:
                break
            length = len(waiting[0].request.input_ids)
            if admitted and tokens + length > self.max_batch_prefill_tokens:
                break
            tokens += length
            admitted.append((waiting.popleft(), row))
        return admitted
