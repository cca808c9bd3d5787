"""Next-token selection over a logits vector [V], in numpy: greedy or seeded sampling.

Order of operations: ``adjust_logits`` -- repetition penalty (Hugging Face's, over prompt and output),
presence and frequency penalties (OpenAI's, over the generated tokens only), ``logit_bias`` -- then
the loop's constraint mask (runtime.constrain), then ``pick``: greedy, or (sampling) temperature,
top-k, top-p and a draw from the softmax with a seeded ``np.random.Generator``.
Greedy picks the argmax; ties go to the lowest id. Any temperature > 0 and repetition_penalty > 0 work:
temperature scaling is done in float64 after subtracting the best logit (a tiny temperature is
greedy in effect), and a penalised logit saturates at float32's largest value instead of overflowing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .errors import EdgeVLMError

F32_MAX = float(np.finfo(np.float32).max)


@dataclass
class SamplingConfig:
    """How to pick the next token. ``top_k=0`` and ``top_p=1.0`` switch those filters off."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit; -100 bans
    presence_penalty: float = 0.0  # subtracted once from each token already generated (-2..2)
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens (-2..2)

    def validate(self) -> None:
        if self.do_sample and not self.temperature > 0:
            raise EdgeVLMError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k < 0:
            raise EdgeVLMError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise EdgeVLMError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise EdgeVLMError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise EdgeVLMError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        for tid, bias in dict(self.logit_bias).items():
            if isinstance(tid, bool) or not isinstance(tid, (int, np.integer)) or tid < 0:
                raise EdgeVLMError(f"logit_bias keys must be token ids (ints >= 0), got {tid!r}")
            if not -100.0 <= float(bias) <= 100.0:
                raise EdgeVLMError(f"logit_bias values must be in [-100, 100], got {bias} for token {tid}")


def apply_repetition_penalty(
    logits: np.ndarray, context: Sequence[int], penalty: float
) -> np.ndarray:
    """CTRL-style penalty on ids in ``context``: positive logits / penalty, negative * penalty."""
    if penalty == 1.0 or len(context) == 0:
        return logits
    ids = np.unique(np.asarray(context, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < logits.shape[-1])]  # e.g. IMAGE_TOKEN_INDEX is not a vocab id
    out = logits.copy()
    vals = out[ids].astype(np.float64)
    scaled = np.where(vals > 0, vals / penalty, vals * penalty)
    out[ids] = np.clip(scaled, -F32_MAX, F32_MAX)  # a tiny or huge penalty saturates, never inf/NaN
    return out


def apply_presence_frequency(
    logits: np.ndarray, generated: Sequence[int], presence: float, frequency: float
) -> np.ndarray:
    """OpenAI's penalties: ``logit[j] -= count[j] * frequency + (count[j] > 0) * presence``, with
    ``count`` over the generated tokens (not the prompt)."""
    if (presence == 0.0 and frequency == 0.0) or len(generated) == 0:
        return logits
    ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
    keep = ids < logits.shape[-1]
    ids, counts = ids[keep], counts[keep]
    out = logits.copy()
    out[ids] -= (counts * frequency + presence).astype(np.float32)
    return out


def apply_logit_bias(logits: np.ndarray, bias: dict[int, float]) -> np.ndarray:
    """Add ``bias[id]`` to each named logit; an id outside the vocabulary is an EdgeVLMError."""
    if not bias:
        return logits
    ids = np.fromiter((int(i) for i in bias), dtype=np.int64, count=len(bias))
    if ids.max() >= logits.shape[-1]:
        raise EdgeVLMError(f"logit_bias names token id {int(ids.max())} but the vocabulary has "
                           f"{logits.shape[-1]} tokens (ids 0..{logits.shape[-1] - 1})")
    out = logits.copy()
    out[ids] += np.fromiter((float(v) for v in bias.values()), dtype=np.float32, count=len(bias))
    return out


def adjust_logits(
    logits: np.ndarray, cfg: SamplingConfig, context: Sequence[int] = (), generated: Sequence[int] = ()
) -> np.ndarray:
    """Penalties and bias, before any mask or sampling filter (float32 [V]; NaN logits refused)."""
    x = apply_repetition_penalty(_check_logits(logits), context, cfg.repetition_penalty)
    x = apply_presence_frequency(x, generated, cfg.presence_penalty, cfg.frequency_penalty)
    return apply_logit_bias(x, cfg.logit_bias)


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


def temperature_scaled(x: np.ndarray, temperature: float) -> np.ndarray:
    """``x / temperature`` in float64 after subtracting the largest finite logit: the best token is 0 and
    the rest <= 0, so any temperature > 0 (1e-40 included) gives finite or -inf values, never NaN."""
    z = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore"):  # (below the best) / a subnormal temperature -> -inf: probability 0
        return (z - np.max(z[np.isfinite(z)])) / float(temperature)


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
    generated: Sequence[int] = (),
) -> int:
    """The next token id from ``logits`` [V]. ``context``: ids already in the sequence (prompt and
    output); ``generated``: the output's ids alone (presence/frequency penalties)."""
    return pick(adjust_logits(logits, cfg, context, generated), cfg, rng)


def pick(x: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator | None = None) -> int:
    """Greedy or sampled choice from adjusted (and possibly masked: -inf) logits ``x`` [V]."""
    if not np.isfinite(x).any():
        raise EdgeVLMError("every token is banned (logit_bias and the constraint leave none)")
    if not cfg.do_sample:
        return int(np.argmax(x))  # first maximum: ties go to the lowest id
    if rng is None:
        raise ValueError("sampling needs a np.random.Generator")
    x = temperature_scaled(x, cfg.temperature)
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

    def __call__(self, logits: np.ndarray, context: Sequence[int] = (), generated: Sequence[int] = ()) -> int:
        return select_token(logits, self.cfg, self.rng, context, generated)

    def adjust(self, logits: np.ndarray, context: Sequence[int], generated: Sequence[int]) -> np.ndarray:
        return adjust_logits(logits, self.cfg, context, generated)

    def pick(self, x: np.ndarray) -> int:
        return pick(x, self.cfg, self.rng)
