"""Per-token log-probabilities from the generation loop's own logits (OpenAI's ``logprobs`` /
``top_logprobs``), the same on every backend.

Which distribution: the log-softmax of the logits the token was chosen from after the repetition,
presence and frequency penalties, ``logit_bias`` and the constraint mask (masked tokens: -inf, never
listed), and before temperature, top-k and top-p (those only shape the random draw). With greedy
decoding the chosen token is the top entry. When a constraint ends the run, the EOS it forces
(no decode step) has logprob 0.0: the mask left it as the only token.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .constrain import token_bytes
from .errors import EdgeVLMError
from .tokenizer import TextTokenizer

MAX_TOP_LOGPROBS = 20


@dataclass
class TopLogprob:
    token_id: int
    token: str  # the token's text (U+FFFD where its bytes are not whole UTF-8)
    bytes: list[int]
    logprob: float


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    bytes: list[int]
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)  # most likely first (ties: lower id first)


def check_top_logprobs(logprobs: bool, top_logprobs: int) -> None:
    if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) \
            or not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise EdgeVLMError(f"top_logprobs must be an int in 0..{MAX_TOP_LOGPROBS}, got {top_logprobs!r}")
    if top_logprobs and not logprobs:
        raise EdgeVLMError("top_logprobs needs logprobs=True")


def log_softmax(x: np.ndarray) -> np.ndarray:
    """float64 log-softmax of [V] logits; -inf entries stay -inf."""
    z = np.asarray(x, dtype=np.float64)
    m = np.max(z)
    return z - (m + np.log(np.sum(np.exp(z - m))))


class LogprobRecorder:
    """Appends one ``TokenLogprob`` per chosen token to ``entries`` (shared with ``Stream``)."""

    def __init__(self, tokenizer: TextTokenizer, top_logprobs: int, entries: list[TokenLogprob]):
        self.tokenizer = tokenizer
        self.k = top_logprobs
        self.entries = entries
        self._text: dict[int, tuple[str, list[int]]] = {}

    def describe(self, token_id: int) -> tuple[str, list[int]]:
        got = self._text.get(token_id)
        if got is None:
            raw = token_bytes(self.tokenizer, token_id)
            got = self._text[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return got

    def record(self, x: np.ndarray, token: int) -> None:
        """``x``: the adjusted, masked logits [V] the token was chosen from."""
        lp = log_softmax(x)
        top: list[TopLogprob] = []
        if self.k:
            k = min(self.k, lp.size)
            cand = np.argpartition(-lp, k - 1)[:k]
            cand = sorted((int(i) for i in cand if np.isfinite(lp[i])), key=lambda i: (-lp[i], i))
            top = [TopLogprob(i, *self.describe(i), float(lp[i])) for i in cand]
        self.entries.append(TokenLogprob(int(token), *self.describe(int(token)), float(lp[token]), top))

    def record_forced(self, token: int) -> None:
        """A token the constraint forced (the only one its mask allowed): probability 1."""
        text, raw = self.describe(int(token))
        top = [TopLogprob(int(token), text, raw, 0.0)] if self.k else []
        self.entries.append(TokenLogprob(int(token), text, raw, 0.0, top))
