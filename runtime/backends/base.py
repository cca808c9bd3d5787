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


# Options every backend takes, with the same meaning (``Runtime.load(path, **options)``):
#   threads      CPU threads for the backend's kernels; None or 0 = every usable core (hostcpu.usable_cpus)
#   verbose      the backend library's own log on stderr (each backend documents what that shows)
#   max_context  the most positions a sequence may hold (visual + prompt + generated tokens; default:
#                the model's); a longer prompt is refused with ContextLengthError before it runs and
#                generation stops there. Above what the model (or a TensorRT engine) holds is refused.
COMMON_OPTIONS = ("threads", "verbose", "max_context")


def check_options(backend: str, options: dict, own: Sequence[str]) -> None:
    """Refuse options that backend ``backend`` does not know (the common ones plus its ``own``),
    listing the ones it does."""
    from ..errors import EdgeVLMError

    valid = (*COMMON_OPTIONS, *own)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise EdgeVLMError(f"unknown {backend} backend option(s) {', '.join(unknown)}; valid: {', '.join(valid)}")


def context_limit(max_context: int | None, model_max: int, what: str) -> int:
    """The option ``max_context`` checked against the most positions the model holds (``what`` says
    where that limit comes from); None = ``model_max``."""
    from ..errors import EdgeVLMError

    if max_context is None:
        return int(model_max)
    if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 1:
        raise EdgeVLMError(f"max_context must be a positive integer, got {max_context!r}")
    if max_context > model_max:
        raise EdgeVLMError(f"max_context {max_context} exceeds the {model_max} positions of {what}")
    return max_context
