"""Text of a generation run with stop strings: nothing that may begin a stop string is emitted early.

Stop strings are matched on text that later tokens cannot change (see IncrementalDetokenizer): the
text of an open run of byte-fallback tokens -- ``<0x0A>`` for "\n" in Llama vocabularies -- becomes
final one token later, so such a stop may cost one extra decode step.
"""
from __future__ import annotations

from typing import Sequence

from .tokenizer import IncrementalDetokenizer, TextTokenizer


def held_back_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class TextState:
    """Incremental text with stop strings: nothing that may begin a stop string is emitted early."""

    def __init__(self, tokenizer: TextTokenizer, stops: Sequence[str]):
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stops = tuple(stops)

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (new text to emit, whether a stop string was completed)."""
        self.detok.update(token_id)
        return self._emit(final=False)

    def finish(self) -> tuple[str, bool]:
        """No more tokens: emit the rest (held-back text may still complete a stop string)."""
        self.detok.finalize()
        return self._emit(final=True)

    def _emit(self, final: bool) -> tuple[str, bool]:
        d = self.detok
        start = len(d.emitted)  # an unseen stop can only begin in the held-back tail
        hits = [i for i in (d.stable.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            return d.take(min(hits)), True
        keep = 0 if final else held_back_length(d.stable, self.stops)
        return d.take(len(d.stable) - keep), False

    @property
    def text(self) -> str:
        return self.detok.emitted
