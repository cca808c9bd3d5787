"""Teacher-forced comparison of two backends on one sequence.

The reference backend decodes greedily; the target is fed the reference's tokens, so both see the
same history at every step and their next-token logits can be compared position by position. The
metrics are llama.cpp's quantisation-quality ones (``perplexity --kl-divergence``): KL(p_ref || p_target),
"same top token", the change in probability of the token that comes next (RMS Δp), max |logit
difference|; plus the reference's top-1 margin at each step and the cosine of the two backends'
visual embeddings. The sequence ends at the reference's end-of-sequence token when one is given, so
"every step has the same top token" is exactly "the target's own greedy answer equals the reference's".

The margin decides whether a token comparison means anything. When two backends' logits differ by
at most ``atol`` everywhere, their argmax can only differ where the reference's top-1 lead over the
runner-up is at most ``2 * atol``: there a different token is numerical noise (another CPU's
kernels, another reduction order), not a defect. So parity is judged on the logits at every step
and on the tokens only where the margin is clear. numpy only: usable on a device, at export and in tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .backends.base import Backend


@dataclass
class Comparison:
    """One sequence, ``S`` steps (the prefill's last position, then one per decoded token)."""

    tokens: list[int]  # the reference's greedy tokens, one per step
    target_tokens: list[int]  # the target's top token at each step (fed the reference's history)
    max_abs: np.ndarray  # [S] max |logit_ref - logit_target|
    margin: np.ndarray  # [S] reference top-1 minus top-2 logit
    kl: np.ndarray  # [S] KL(p_ref || p_target) in nats
    dp: np.ndarray  # [S] p_target - p_ref of the reference's token at each step
    vision_cosine: np.ndarray | None = None  # [M] per visual token cosine of the two embeddings

    @property
    def vision_cosine_min(self) -> float | None:
        return None if self.vision_cosine is None or not self.vision_cosine.size else float(self.vision_cosine.min())

    @property
    def same_top(self) -> np.ndarray:  # [S] bool
        return np.asarray(self.tokens) == np.asarray(self.target_tokens)

    def clear(self, atol: float) -> np.ndarray:
        """[S] bool: steps whose reference margin is beyond what an ``atol`` logit error can flip."""
        return self.margin > 2 * atol

    def clear_prefix(self, atol: float) -> int:
        """Leading steps that are all clear: a target's own greedy run must match them exactly."""
        unclear = np.flatnonzero(~self.clear(atol))
        return int(unclear[0]) if unclear.size else len(self.tokens)

    def problems(self, atol: float) -> list[str]:
        """What breaks parity at logit tolerance ``atol`` (empty: the target matches)."""
        out = []
        over = np.flatnonzero(~(self.max_abs <= atol))  # NaN counts as over
        if over.size:
            i = int(over[0])
            out.append(f"logits differ by {float(np.nanmax(self.max_abs)):.3g} > {atol} "
                       f"(first at step {i} of {len(self.tokens)})")
        wrong = np.flatnonzero(~self.same_top & self.clear(atol))
        if wrong.size:
            i = int(wrong[0])
            out.append(f"top token {self.target_tokens[i]} instead of {self.tokens[i]} at step {i}, where the "
                       f"reference's margin {self.margin[i]:.3g} is clear (> 2 x {atol})")
        return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def top_margin(logits: np.ndarray) -> float:
    """Top-1 minus top-2 logit of a [V] row."""
    top2 = np.partition(np.asarray(logits, dtype=np.float64), -2)[-2:]
    return float(top2[1] - top2[0])


def kl_divergence(ref: np.ndarray, target: np.ndarray) -> float:
    """KL(softmax(ref) || softmax(target)) of two [V] logit rows, in nats."""
    lp, lq = log_softmax(ref), log_softmax(target)
    return float((np.exp(lp) * (lp - lq)).sum())


def prob_change(ref: np.ndarray, target: np.ndarray, token: int) -> float:
    """p_target(token) - p_ref(token) of two [V] logit rows (llama.cpp's Δp)."""
    return float(np.exp(log_softmax(target)[token]) - np.exp(log_softmax(ref)[token]))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-token cosine similarity of two [..., D] embedding arrays -> [N] (N = all leading dims)."""
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest per-token cosine similarity of two [..., D] embedding arrays (1.0 when empty)."""
    cos = cosine(a, b)
    return float(cos.min()) if cos.size else 1.0


def compare_greedy(ref: Backend, target: Backend, prompt_ids: Sequence[int], pixel_values: np.ndarray | None,
                   steps: int, eos_id: int | None = None) -> Comparison:
    """Each backend encodes the image itself and prefills the prompt; then up to ``steps - 1`` decode
    steps follow with the reference's greedy tokens (ties to the lowest id, like ``sampling.greedy``),
    stopping after the step where the reference picks ``eos_id``."""
    from .generate import split_segments

    if steps < 1:
        raise ValueError("steps must be >= 1")
    vis_r = vis_t = None
    if pixel_values is not None:
        vis_r, vis_t = ref.encode_image(pixel_values), target.encode_image(pixel_values)  # [B, M, D] each
    rows = []
    lr, lt = ref.prefill(split_segments(prompt_ids, vis_r)), target.prefill(split_segments(prompt_ids, vis_t))
    for i in range(steps):
        rows.append((np.asarray(lr, np.float32), np.asarray(lt, np.float32)))
        tok = int(np.argmax(lr))
        if i + 1 == steps or tok == eos_id:
            break
        lr, lt = ref.decode(tok), target.decode(tok)
    tokens = [int(np.argmax(r)) for r, _ in rows]
    return Comparison(
        tokens=tokens, target_tokens=[int(np.argmax(t)) for _, t in rows],
        max_abs=np.array([float(np.abs(r - t).max()) for r, t in rows]),
        margin=np.array([top_margin(r) for r, _ in rows]),
        kl=np.array([kl_divergence(r, t) for r, t in rows]),
        dp=np.array([prob_change(r, t, k) for (r, t), k in zip(rows, tokens)]),
        vision_cosine=None if vis_r is None else cosine(vis_r, vis_t))


def summarise(comparisons: Sequence[Comparison]) -> dict:
    """Pooled metrics over several sequences (the manifest's and the benchmark's fidelity record)."""
    kl = np.concatenate([c.kl for c in comparisons])
    same = np.concatenate([c.same_top for c in comparisons])
    dp = np.concatenate([c.dp for c in comparisons])
    vis = [c.vision_cosine for c in comparisons if c.vision_cosine is not None and c.vision_cosine.size]
    vis_all = np.concatenate(vis) if vis else None
    return {"n_sequences": len(comparisons), "n_positions": int(kl.size),
            "kl_mean": float(kl.mean()), "kl_median": float(np.median(kl)), "kl_p99": float(np.quantile(kl, 0.99)),
            "same_top_token": float(same.mean()), "rms_dp": float(np.sqrt((dp ** 2).mean())),
            "max_abs_logit_diff": float(max(float(c.max_abs.max()) for c in comparisons)),
            "same_greedy_answer": f"{sum(bool(c.same_top.all()) for c in comparisons)}/{len(comparisons)}",
            "vision_cosine_min": None if vis_all is None else float(vis_all.min()),
            "vision_cosine_mean": None if vis_all is None else float(vis_all.mean())}


class Recorder(Backend):
    """Wraps a reference backend and keeps what its last sequence returned (visual embeddings and
    the logits of every step), so a fidelity run can save the reference once and ``Replay`` it."""

    def __init__(self, inner: Backend):
        self.inner, self.name, self.n_ctx = inner, f"recorded {inner.name}", inner.n_ctx
        self.vision: np.ndarray | None = None
        self.logits: list[np.ndarray] = []

    def encode_image(self, pixel_values: np.ndarray) -> np.ndarray:
        self.vision = np.asarray(self.inner.encode_image(pixel_values), np.float32)
        return self.vision

    def prefill(self, segments: Sequence[np.ndarray]) -> np.ndarray:
        self.logits = []
        return self._keep(self.inner.prefill(segments))

    def decode(self, token_id: int) -> np.ndarray:
        return self._keep(self.inner.decode(token_id))

    def _keep(self, logits: np.ndarray) -> np.ndarray:
        self.logits.append(np.asarray(logits, np.float32).copy())
        return self.logits[-1]


class Replay(Backend):
    """A recorded reference sequence played back: the same visual embeddings and, step by step, the
    same logits. Only valid for the prompt and token sequence it was recorded on (``compare_greedy``
    feeds it exactly those: the reference's own greedy tokens)."""

    name = "replay"

    def __init__(self, vision: np.ndarray | None, logits: np.ndarray):
        self.vision, self.logits, self._step = vision, logits, 0

    def encode_image(self, pixel_values: np.ndarray) -> np.ndarray:
        if self.vision is None:
            raise ValueError("this recorded sequence has no image")
        return self.vision

    def prefill(self, segments: Sequence[np.ndarray]) -> np.ndarray:
        self._step = 0
        return self.logits[0]

    def decode(self, token_id: int) -> np.ndarray:
        self._step += 1
        if self._step >= len(self.logits):
            raise ValueError(f"replay ran past its {len(self.logits)} recorded steps")
        return self.logits[self._step]
