"""Next-token selection over a logits vector [V], in numpy: greedy or seeded sampling.

Order of operations (as in Hugging Face generation): repetition penalty, then (sampling only)
temperature, top-k, top-p, then a draw from the softmax with a seeded ``np.random.Generator``.
Greedy picks the argmax; ties go to the lowest id.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import EdgeVLMError


@dataclass
class SamplingConfig:
    """How to pick the next token. ``top_k=0`` and ``top_p=1.0`` switch those filters off."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        if self.do_sample and not self.temperature > 0:
            raise EdgeVLMError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k < 0:
            raise EdgeVLMError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise EdgeVLMError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise EdgeVLMError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(
    logits: np.ndarray, context: Sequence[int], penalty: float
) -> np.ndarray:
    """CTRL-style penalty on ids in ``context``: positive logits / penalty, negative * penalty."""
    if penalty == 1.0 or len(context) == 0:
        return logits
    ids = np.unique(np.asarray(context, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < logits.shape[-1])]  # e.g. IMAGE_TOKEN_INDEX is not a vocab id
    out = logits.copy()
    vals = out[ids]
    out[ids] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def top_k_mask(logits: np.ndarray, k: int) -> np.ndarray:
    """Boolean keep-mask of the ``k`` largest logits (ties with the k-th are kept too)."""
    if k <= 0 or k >= logits.shape[-1]:
        return np.ones(logits.shape, dtype=bool)
    kth = np.partition(logits, -k)[-k]
    return logits >= kth


def top_p_mask(logits: np.ndarray, p: float) -> np.ndarray:
    """Boolean keep-mask of the smallest set of most likely tokens whose probability reaches ``p``.

    The most likely token is always kept.
    """
    if p >= 1.0:
        return np.ones(logits.shape, dtype=bool)
    order = np.argsort(-logits, kind="stable")
    probs = softmax(logits[order])
    before = np.cumsum(probs) - probs  # probability mass of the tokens ranked above each one
    keep = np.zeros(logits.shape, dtype=bool)
    keep[order[before < p]] = True
    keep[order[0]] = True
    return keep


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax in float64 (masked entries may be -inf)."""
    z = np.asarray(x, dtype=np.float64)
    z = np.exp(z - np.max(z))
    return z / z.sum()


def _check_logits(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float32).reshape(-1)
    if logits.size == 0 or np.isnan(logits).any() or not np.isfinite(logits).any():
        raise EdgeVLMError(
            "the backend returned NaN or all-infinite logits; the model or bundle is broken"
        )
    return logits


def select_token(
    logits: np.ndarray,
    cfg: SamplingConfig,
    rng: np.random.Generator | None = None,
    context: Sequence[int] = (),
) -> int:
    """The next token id from ``logits`` [V]. ``context``: ids already in the sequence."""
    x = apply_repetition_penalty(_check_logits(logits), context, cfg.repetition_penalty)
    if not cfg.do_sample:
        return int(np.argmax(x))  # first maximum: ties go to the lowest id
    if rng is None:
        raise ValueError("sampling needs a np.random.Generator")
    x = x / np.float32(cfg.temperature)
    x = np.where(top_k_mask(x, cfg.top_k), x, -np.inf)  # top-p sees the top-k distribution
    ids = np.flatnonzero(top_p_mask(x, cfg.top_p) & np.isfinite(x))
    probs = softmax(x[ids])
    u = rng.random()
    pick = int(np.searchsorted(np.cumsum(probs), u * probs.sum(), side="right"))
    return int(ids[min(pick, len(ids) - 1)])


class Sampler:
    """``select_token`` with its own seeded generator: ``Sampler(cfg)(logits, context)``."""

    def __init__(self, cfg: SamplingConfig):
        cfg.validate()
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)

    def __call__(self, logits: np.ndarray, context: Sequence[int] = ()) -> int:
        return select_token(logits, self.cfg, self.rng, context)
