"""Teacher-forced comparison of two backends on one sequence.

The reference backend decodes greedily; the target is fed the reference's tokens, so both see the
same history at every step and their next-token logits can be compared position by position. The
metrics are llama.cpp's quantisation-quality ones (``perplexity --kl-divergence``): KL(p_ref || p_target),
"same top token", max |logit difference|; plus the reference's top-1 margin at each step.

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
    vision_cosine_min: float | None = None  # smallest per-token cosine of the two visual embeddings

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


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-token cosine similarity of two [..., D] embedding arrays -> [N] (N = all leading dims)."""
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest per-token cosine similarity of two [..., D] embedding arrays (1.0 when empty)."""
    cos = cosine(a, b)
    return float(cos.min()) if cos.size else 1.0


def compare_greedy(ref: Backend, target: Backend, prompt_ids: Sequence[int], pixel_values: np.ndarray | None,
                   steps: int) -> Comparison:
    """Each backend encodes the image itself and prefills the prompt; then ``steps - 1`` decode
    steps follow with the reference's greedy tokens (ties to the lowest id, like ``sampling.greedy``)."""
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
        if i + 1 < steps:
            tok = int(np.argmax(lr))
            lr, lt = ref.decode(tok), target.decode(tok)
    return Comparison(
        tokens=[int(np.argmax(r)) for r, _ in rows], target_tokens=[int(np.argmax(t)) for _, t in rows],
        max_abs=np.array([float(np.abs(r - t).max()) for r, t in rows]),
        margin=np.array([top_margin(r) for r, _ in rows]),
        kl=np.array([kl_divergence(r, t) for r, t in rows]),
        vision_cosine_min=None if vis_r is None or not vis_r.size else cosine_min(vis_r, vis_t))


def summarise(comparisons: Sequence[Comparison]) -> dict:
    """Pooled metrics over several sequences (the manifest's and the benchmark's fidelity record)."""
    kl = np.concatenate([c.kl for c in comparisons])
    same = np.concatenate([c.same_top for c in comparisons])
    return {"n_sequences": len(comparisons), "n_positions": int(kl.size),
            "kl_mean": float(kl.mean()), "kl_median": float(np.median(kl)), "kl_p99": float(np.quantile(kl, 0.99)),
            "same_top_token": float(same.mean()),
            "max_abs_logit_diff": float(max(float(c.max_abs.max()) for c in comparisons)),
            "same_greedy_answer": f"{sum(bool(c.same_top.all()) for c in comparisons)}/{len(comparisons)}",
            "vision_cosine_min": min((c.vision_cosine_min for c in comparisons if c.vision_cosine_min is not None),
                                     default=None)}
