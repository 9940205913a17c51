"""A test-only fault hook: a backend wrapper whose next forwards fail, or stall, when told to.

Reliability tests reach it over the real path (`fault_injection: true` in the app's args, then
`NeuronBatcher.inject_fault`), so what fails is the backend call itself, exactly where a Neuron
runtime error would surface, and everything above it runs unchanged. Off by default; a replica
without it refuses `inject_fault`.
"""

from __future__ import annotations

import threading
import time
from typing import Literal, Sequence

from . import Backend, PrefillOutput

Forward = Literal["prefill", "decode", "any"]


class InjectedFault(RuntimeError):
    """The failure the hook raises; its message says it was injected."""


class FaultInjectingBackend:
    def __init__(self, backend: Backend):
        self.backend = backend
        self._lock = threading.Lock()
        self._kind: Forward = "any"
        self._remaining = 0
        self._stall_s = 0.0

    def __getattr__(self, name: str):  # batch_size, max_tokens, vocab_size, prefills_subset, description ...
        return getattr(self.backend, name)

    def arm(self, kind: Forward, times: int, stall_s: float = 0.0) -> None:
        """Fail the next `times` forwards of `kind` (`times` = 0 disarms); with `stall_s`, they hang that
        long instead, then run (as a stalled Neuron runtime would)."""
        with self._lock:
            self._kind, self._remaining, self._stall_s = kind, times, stall_s

    def _maybe_fail(self, forward: str) -> None:
        with self._lock:
            if self._remaining <= 0 or self._kind not in (forward, "any"):
                return
            self._remaining -= 1
            stall_s = self._stall_s
        if stall_s:
            time.sleep(stall_s)
            return
        raise InjectedFault(f"injected {forward} fault")

    def prefill(self, rows: Sequence[int], token_ids, prompt_logprobs: bool = False, sampling=None) -> PrefillOutput:
        self._maybe_fail("prefill")
        return self.backend.prefill(rows, token_ids, prompt_logprobs=prompt_logprobs, sampling=sampling)

    def decode(self, rows: Sequence[int], token_ids, positions, sampling=None):
        self._maybe_fail("decode")
        return self.backend.decode(rows, token_ids, positions, sampling=sampling)
