"""The engine: one static batch, stepped one iteration at a time.

`step()` reads top to bottom: take new requests and cancellations → plan (prefill or decode) →
run the backend → sample → append, detokenize, check stops → emit one event per request → free the
rows of finished requests. Only `_advance` changes a request's state.

`submit` and `cancel` may be called from any thread; everything else runs on the thread that calls
`step`. A failing forward fails only the requests that were in it, and frees their rows; a request
whose own sampler cannot be built, or whose own sampling fails, fails alone. Any other fault in a step
fails every request the engine holds, and the next step starts clean.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import AbstractSet, Literal, Sequence

from .backends import Backend
from .batch import Slot, StaticBatch
from .config import Limits
from .detokenizer import IncrementalDetokenizer, generated_text
from .errors import ConfigError
from .request import ErrorEvent, Event, Finish, GenerationRequest, SamplingParams, Token, TokenEvent, is_last
from .sampler import Choice, RequestSampler, choose
from .scheduler import InsertionPolicy, PrefillPolicy, Scheduler, StepPlan, WaitingRequest
from .stopping import StopCondition

logger = logging.getLogger(__name__)


@dataclass
class StepStats:
    """What one step did: the numbers TGI's batch metrics are made of."""

    kind: Literal["prefill", "decode"]
    rows: int  # rows in the forward pass
    inserted: int  # new requests a prefill took in
    rebuilt: int  # active rows whose KV cache the prefill rebuilt
    forward_s: float  # the backend call
    total_s: float  # forward + sampling, detokenizing, stopping
    active: int  # rows busy after the step
    waiting: int  # requests queued after the step
    failed: bool
    concat: str | None = None  # a prefill into a running batch: why (`StepPlan.concat`)
    filter_s: float = 0.0  # handing the step's events to their requests (set by whoever does that)


class Engine:
    def __init__(
        self,
        backend: Backend,
        tokenizer,
        limits: Limits,
        eos_ids: AbstractSet[int],
        insertion: InsertionPolicy = InsertionPolicy("insert"),
        prefill_policy: PrefillPolicy = PrefillPolicy(),
    ):
        if insertion.name == "insert" and not backend.prefills_subset:
            raise ConfigError(
                f"`insertion: insert` needs a model that prefills some rows only, but {backend.description} "
                "rewrites every row's KV cache at each prefill (compiled without continuous batching): "
                "use `insertion: rebuild` (or `auto`), or compile with batch_size > 1 and continuous batching"
            )
        if limits.max_batch_size > backend.batch_size:
            raise ConfigError(f"`max_batch_size` ({limits.max_batch_size}) exceeds the backend's {backend.batch_size} rows")
        self.backend = backend
        self.tokenizer = tokenizer
        self.limits = limits
        self.eos_ids = frozenset(eos_ids)
        self.special_ids = frozenset(tokenizer.all_special_ids)  # TGI's `special`: EOS ids outside it are not
        self.batch = StaticBatch(limits.max_batch_size)
        self.scheduler = Scheduler(prefill_policy, insertion, limits.max_batch_prefill_tokens, backend.max_prefill_tokens)
        self.waiting: deque[WaitingRequest] = deque()
        self._lock = threading.Lock()
        self._inbox: list[WaitingRequest] = []
        self._cancelled: set[str] = set()
        self.last_step: StepStats | None = None  # what the latest step did, for metrics
        self.consecutive_failures = 0  # failed forwards in a row: a broken backend keeps failing

    # -- called from any thread ---------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> None:
        with self._lock:
            self._inbox.append(WaitingRequest(request, time.monotonic()))

    def cancel(self, request_id: str) -> None:
        """Forget a request (its caller stopped listening); its row is freed at the next step. A request
        submitted later under the same id is a new one, and runs."""
        with self._lock:
            self._inbox = [w for w in self._inbox if w.request.id != request_id]
            self._cancelled.add(request_id)

    @property
    def has_work(self) -> bool:
        return bool(self._inbox or self._cancelled or self.waiting or self.batch.active())

    # -- the step ------------------------------------------------------------------------------

    def step(self) -> list[Event]:
        events: list[Event] = self._take_inbox()
        plan = self.scheduler.schedule(self.waiting, self.batch)
        if plan.is_empty:
            return events
        try:
            self._run(plan, events)
        except Exception as e:  # a bug outside the forward: every request held here fails, and the engine serves on
            logger.exception("engine step crashed")
            ended = {event.request_id for event in events if is_last(event)}  # finished, or failed alone
            events += self.fail_all(e, [w.request.id for w, _ in plan.admit if w.request.id not in ended])
        return events

    def _run(self, plan: StepPlan, events: list[Event]) -> None:
        """Runs `plan`, adding each request's event to `events`."""
        started = time.perf_counter()
        new_slots = []
        for waiting, row in plan.admit:
            try:
                new_slots.append(self._new_slot(waiting, row))
            except Exception as e:  # its own parameters: it fails alone, and its row stays free
                logger.exception("request %s failed", waiting.request.id)
                events.append(ErrorEvent(waiting.request.id, f"Request failed: {type(e).__name__}: {e}"))
        if plan.is_prefill and not new_slots:
            return  # no new request left to prefill (nor a reason to rebuild the others' rows)
        try:
            if plan.is_prefill:
                slots = new_slots
                logits, prompt_tokens = self._prefill(plan, new_slots)
            else:
                slots = plan.decode
                prompt_tokens = [None] * len(slots)
                logits = self.backend.decode(
                    [s.row for s in slots],
                    [s.token_ids[-1] for s in slots],
                    [s.next_position for s in slots],
                    sampling=[s.request.sampling for s in slots],
                )
            forwarded = time.perf_counter()
            choices = choose(logits, [s.sampler for s in slots], [s.token_ids for s in slots])
        except Exception as e:  # the forward failed: fail exactly the requests that were in it
            logger.exception("step failed")
            self._record(plan, len(new_slots), started, time.perf_counter(), failed=True)
            events += [self._fail(slot, e) for slot in new_slots + plan.rebuild + plan.decode]
            return
        for slot, choice, prompt in zip(slots, choices, prompt_tokens):
            try:
                if isinstance(choice, Exception):  # its own sampling failed: the forward did not
                    raise choice
                events.append(self._advance(slot, choice, prompt))
            except Exception as e:
                logger.exception("request %s failed", slot.id)
                events.append(self._fail(slot, e))
        self._record(plan, len(new_slots), started, forwarded, failed=False)

    def _record(self, plan: StepPlan, inserted: int, started: float, forwarded: float, failed: bool) -> None:
        self.consecutive_failures = self.consecutive_failures + 1 if failed else 0
        self.last_step = StepStats(
            kind="prefill" if plan.is_prefill else "decode",
            rows=inserted + len(plan.rebuild) + len(plan.decode),
            inserted=inserted,
            rebuilt=len(plan.rebuild),
            forward_s=forwarded - started,
            total_s=time.perf_counter() - started,
            active=len(self.batch.active()),
            waiting=len(self.waiting),
            failed=failed,
            concat=plan.concat,
        )

    def _take_inbox(self) -> list[Event]:
        """Queue new requests (refusing those that cannot fit), drop cancelled ones."""
        with self._lock:
            inbox, self._inbox = self._inbox, []
            cancelled, self._cancelled = self._cancelled, set()
        if cancelled:  # before this inbox: `cancel` took its own requests out of it already
            self.waiting = deque(w for w in self.waiting if w.request.id not in cancelled)
            for slot in self.batch.active():
                if slot.id in cancelled:
                    self.batch.release(slot)
        rejected: list[Event] = []
        for waiting in inbox:
            problem = self._unfit(waiting.request)
            if problem:
                rejected.append(ErrorEvent(waiting.request.id, problem, error_type="validation"))
            else:
                self.waiting.append(waiting)
        return rejected

    def _unfit(self, request: GenerationRequest) -> str | None:
        n = len(request.input_ids)
        if n == 0:
            return "`inputs` cannot be empty"
        if n > self.limits.max_input_tokens:
            return f"`inputs` must have less than {self.limits.max_input_tokens} tokens. Given: {n}"
        if request.stopping.max_new_tokens < 1:
            return "`max_new_tokens` must be strictly positive"
        return None

    def _new_slot(self, waiting: WaitingRequest, row: int) -> Slot:
        request = waiting.request
        sampling = request.sampling
        if self.backend.samples_on_device:  # the device drew the token (with its own seed): the host takes it as is
            sampling = SamplingParams(top_n_tokens=sampling.top_n_tokens)
        slot = Slot(
            row=row,
            request=request,
            sampler=RequestSampler(sampling),
            stop=StopCondition(request.stopping, self.eos_ids, len(request.input_ids), self.limits.max_total_tokens),
            detokenizer=IncrementalDetokenizer(self.tokenizer, request.input_ids),
            submitted_at=waiting.submitted_at,
        )
        self.batch.insert(slot)
        return slot

    def _prefill(self, plan: StepPlan, new_slots: list[Slot]):
        rows = [s.row for s in plan.rebuild] + [s.row for s in new_slots]
        # A rebuilt row gets back everything but its pending token, which the next decode feeds.
        token_ids = [s.token_ids[:-1] for s in plan.rebuild] + [s.token_ids for s in new_slots]
        want_prompt = any(s.request.prompt_logprobs for s in new_slots)
        sampling = [s.request.sampling for s in plan.rebuild + new_slots]
        output = self.backend.prefill(rows, token_ids, prompt_logprobs=want_prompt, sampling=sampling)
        skip = len(plan.rebuild)
        prompt_tokens = [None] * len(new_slots)
        if want_prompt and output.prompt_logprobs is not None:
            for i, slot in enumerate(new_slots):
                if slot.request.prompt_logprobs:
                    prompt_tokens[i] = self._prompt_tokens(slot.request.input_ids, output.prompt_logprobs[skip + i])
        return output.logits[skip:], prompt_tokens

    def _advance(self, slot: Slot, choice: Choice, prompt_tokens: list[Token] | None) -> TokenEvent:
        token_id = choice.token_id
        slot.token_ids.append(token_id)
        slot.generated += 1
        # A special token's event has its own text (`</s>`), as in TGI, which leaves it out of
        # `generated_text` only; stop sequences see it too (`stop: ["<|eot_id|>"]`).
        text = slot.detokenizer.add(token_id)
        reason = slot.stop.check(token_id, slot.generated, text)
        finish = None
        if reason is not None:
            text += slot.detokenizer.flush()
            now = time.monotonic()
            # End-of-sequence ids add nothing to it, even where the tokenizer does not call them special.
            generated_ids = [i for i in slot.token_ids[len(slot.request.input_ids) :] if i not in self.eos_ids]
            finish = Finish(
                reason=reason,
                generated_text=generated_text(self.tokenizer, slot.request.input_ids, generated_ids),
                generated_tokens=slot.generated,
                seed=slot.sampler.seed,
                queue_time=slot.admitted_at - slot.submitted_at,
                inference_time=now - slot.admitted_at,
            )
            self.batch.release(slot)
        return TokenEvent(
            request_id=slot.id,
            index=slot.generated,
            token=Token(token_id, text, choice.logprob, token_id in self.special_ids),
            top_tokens=[self._token(i, lp) for i, lp in zip(choice.top_ids, choice.top_logprobs)],
            prompt_tokens=prompt_tokens,
            finish=finish,
        )

    def _fail(self, slot: Slot, error: Exception) -> ErrorEvent:
        self.batch.release(slot)
        return ErrorEvent(slot.id, f"Request failed during generation: {type(error).__name__}: {error}")

    def fail_all(self, error: Exception, admitted: Sequence[str] = ()) -> list[Event]:
        """Fail every request, active or waiting, and those `admitted` from the queue into no row yet (after
        a fault outside the forward pass)."""
        events: list[Event] = [self._fail(slot, error) for slot in self.batch.active()]
        failed = {event.request_id for event in events}
        while self.waiting:
            events.append(ErrorEvent(self.waiting.popleft().request.id, f"Request failed: {error}"))
        events += [ErrorEvent(i, f"Request failed: {error}") for i in admitted if i not in failed]
        return events

    def _token(self, token_id: int, logprob: float) -> Token:
        # As TGI decodes top and prompt tokens: no clean-up, which would eat the space of " ." or " 's".
        text = self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return Token(token_id, text, logprob, token_id in self.special_ids)

    def _prompt_tokens(self, input_ids, logprobs) -> list[Token]:
        return [self._token(i, lp) for i, lp in zip(input_ids, logprobs.tolist())]
