"""When a request stops: length, then end-of-sequence, then stop sequences, in TGI's order.

Stop sequences are matched on the generated text, wherever they end inside the text the last token
added (a token can carry more than the stop string). As in TGI, the stop text stays in the output.
The length limit is the smaller of the request's `max_new_tokens` and what the KV cache has room for.
"""

from __future__ import annotations

from typing import AbstractSet

from .request import FinishReason, StoppingParams


class StopCondition:
    def __init__(self, params: StoppingParams, eos_ids: AbstractSet[int], input_length: int, max_total_tokens: int):
        self.max_new_tokens = min(params.max_new_tokens, max_total_tokens - input_length)
        self.eos_ids = frozenset() if params.ignore_eos else frozenset(eos_ids)
        self.stop_sequences = [s for s in params.stop_sequences if s]
        self.longest_stop = max((len(s) for s in self.stop_sequences), default=0)
        self.tail = ""  # the last (longest stop - 1) characters of the generated text

    def check(self, token_id: int, generated_tokens: int, new_text: str) -> FinishReason | None:
        """Call once per generated token, with the count so far and the text the token completed."""
        if generated_tokens >= self.max_new_tokens:
            return FinishReason.LENGTH
        if token_id in self.eos_ids:
            return FinishReason.EOS_TOKEN
        if self.stop_sequences and new_text:
            window = self.tail + new_text
            boundary = len(self.tail)
            keep = self.longest_stop - 1
            self.tail = window[-keep:] if keep else ""
            # Only a match that ends inside the new text is new.
            if any(window.find(s, max(0, boundary - len(s) + 1)) != -1 for s in self.stop_sequences):
                return FinishReason.STOP_SEQUENCE
        return None
