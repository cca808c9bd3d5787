"""The interface every backend implements; the shared loop in ``runtime.generate`` drives it.

A backend holds one sequence at a time. ``prefill`` starts it (resetting the KV cache) from an
ordered list of segments -- token ids or visual token embeddings -- and returns the logits of the
last position; ``decode`` appends one token using the cache. Sampling, stop rules, streaming and
timings are not a backend's business.

Optional, for multi-turn use (``runtime.cache``): a backend with ``supports_prefix`` implements
``prefill_from``, which keeps the first positions of the current sequence's KV cache and runs only
the rest; ``cacheable_images = False`` marks a backend whose ``encode_image`` has side effects the
sequence needs (so its visual tokens must not come from a cache).
"""
from __future__ import annotations

import abc
from typing import Sequence

import numpy as np


class Backend(abc.ABC):
    """One loaded model on one target (torch, ONNX Runtime, llama.cpp, TensorRT, ...)."""

    name: str = "backend"
    n_ctx: int = 0  # max positions: visual tokens + prompt tokens + generated tokens
    supports_prefix: bool = False  # implements prefill_from
    cacheable_images: bool = True  # encode_image is a pure function of the pixels

    @abc.abstractmethod
    def encode_image(self, pixel_values: np.ndarray) -> np.ndarray:
        """Visual tokens in the LLM's embedding space.

        pixel_values: float32 [B, 3, H, W] (from ``runtime.preprocess``) -> float32 [B, M, D].
        """

    @abc.abstractmethod
    def prefill(self, segments: Sequence[np.ndarray]) -> np.ndarray:
        """Start a new sequence (reset the KV cache) and run it; return float32 logits [V] of
        the last position.

        segments, in order: int64 [T] token ids, or float32 [M, D] visual token embeddings.
        """

    @abc.abstractmethod
    def decode(self, token_id: int) -> np.ndarray:
        """Append one token at the next position using the KV cache; return float32 logits [V]."""

    @property
    def n_past(self) -> int:
        """Positions the KV cache holds now (prefix-capable backends say; others 0)."""
        return 0

    def prefill_from(self, keep: int, segments: Sequence[np.ndarray]) -> np.ndarray:
        """Keep the first ``keep`` positions of the current sequence (``0 < keep <=`` its length),
        drop the rest, run ``segments`` at the positions after them; logits [V] of the last."""
        raise NotImplementedError(f"the {self.name} backend cannot keep a KV prefix")

    def close(self) -> None:
        """Release the model's resources (default: nothing to do)."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_visual_segment(segment: np.ndarray) -> bool:
    """True for a [M, D] float embedding segment, False for a [T] integer token-id segment."""
    return segment.ndim == 2


def check_options(backend: str, options: dict, valid: Sequence[str]) -> None:
    """Refuse backend options the backend does not know, listing the ones it does."""
    from ..errors import EdgeVLMError

    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise EdgeVLMError(f"unknown {backend} backend option(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
