"""The runtime's two caches for multi-turn use: image embeddings and the KV prefix.

``ImageCache``: visual tokens [M, D] per image, keyed by the sha256 of the image's preprocessed
pixels (so a path, bytes or PIL image of the same picture hit alike), least recently used first
out, bounded in bytes. A follow-up question about the same image skips the vision encoder.

``PrefixCache``: what the backend's KV cache holds, one key per position (a token id, or
``(image hash, i)`` for the i-th visual token of an image). A new sequence that starts with the
same keys keeps those positions and prefills only the rest (backends with ``supports_prefix``).
It is valid only while one owner (a ``Runtime``) drives the backend.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable, Hashable, Sequence

import numpy as np

from .processor import split_at_images

if TYPE_CHECKING:
    from .backends.base import Backend

DEFAULT_IMAGE_CACHE_MB = 64


def image_key(pixels: np.ndarray) -> str:
    """Content hash of one image's pixel values [3, H, W] (float32 bytes, shape included)."""
    x = np.ascontiguousarray(pixels, dtype=np.float32)
    h = hashlib.sha256(repr(x.shape).encode())
    h.update(x.tobytes())
    return h.hexdigest()


class ImageCache:
    """LRU map image hash -> visual tokens float32 [M, D], holding at most ``max_bytes``."""

    def __init__(self, max_bytes: int = DEFAULT_IMAGE_CACHE_MB << 20):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self.n_bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> np.ndarray | None:
        value = self._items.get(key)
        if value is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: str, value: np.ndarray) -> None:
        if value.nbytes > self.max_bytes or key in self._items:
            return
        self._items[key] = value
        self.n_bytes += value.nbytes
        while self.n_bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.n_bytes -= old.nbytes

    def __len__(self) -> int:
        return len(self._items)

    def lookup(self, keys: list[str], pixel_values: np.ndarray, encode: Callable[[np.ndarray], np.ndarray],
               report: "CacheReport") -> np.ndarray:
        """Visual tokens [B, M, D] for ``pixel_values`` [B, 3, S, S] with hashes ``keys``: cached
        ones from here, the rest from ``encode`` (one batch), which are then cached."""
        found = [self.get(k) for k in keys]
        missing = [i for i, v in enumerate(found) if v is None]
        if missing:
            fresh = encode(pixel_values[missing])  # [len(missing), M, D]
            for i, v in zip(missing, fresh):
                found[i] = v
                self.put(keys[i], v)
        report.images_cached, report.images_encoded = len(keys) - len(missing), len(missing)
        return np.stack(found)  # [B, M, D]


def position_keys(prompt_ids: Sequence[int], image_keys: Sequence[str], n_per_image: int) -> list[Hashable]:
    """One key per prompt position: token ids as they are, each image marker expanded to its
    image's ``n_per_image`` visual positions ``(image hash, i)``."""
    keys: list[Hashable] = []
    for part in split_at_images(prompt_ids):
        if isinstance(part, int):
            keys.extend((image_keys[part], i) for i in range(n_per_image))
        else:
            keys.extend(part)
    return keys


class PrefixCache:
    """The keys of the positions a backend's KV cache holds (see the module docstring)."""

    def __init__(self) -> None:
        self.keys: list[Hashable] = []
        self.hits = 0  # sequences that reused at least one position
        self.reused_tokens = 0  # positions not prefilled again, summed

    def usable(self, new_keys: Sequence[Hashable]) -> int:
        """How many leading positions of ``new_keys`` the cache already holds; at most
        ``len(new_keys) - 1``, so the last position is always run (its logits start decoding)."""
        n = 0
        limit = min(len(self.keys), len(new_keys) - 1)
        while n < limit and self.keys[n] == new_keys[n]:
            n += 1
        return n

    def invalidate(self) -> None:
        self.keys = []


@dataclass
class Caches:
    """The caches a ``Runtime`` lends the generation loop (either may be None: not used)."""

    images: ImageCache | None = None
    prefix: PrefixCache | None = None


@dataclass
class CacheReport:
    """What one generation took from the caches."""

    images_cached: int = 0  # images whose visual tokens came from the ImageCache
    images_encoded: int = 0  # images run through the vision encoder
    prefix_reused: int = 0  # leading positions kept from the previous sequence's KV cache

    def to_dict(self) -> dict:
        return asdict(self)


def drop_positions(segments: list[np.ndarray], n: int) -> list[np.ndarray]:
    """``segments`` without their first ``n`` positions (a segment may be cut part-way)."""
    out = []
    for seg in segments:
        if n >= seg.shape[0]:
            n -= seg.shape[0]
            continue
        out.append(seg[n:])
        n = 0
    return out


def prefill(
    backend: "Backend", segments: list[np.ndarray], keys: list[Hashable] | None,
    prefix: PrefixCache | None, report: CacheReport,
) -> np.ndarray:
    """``backend.prefill``, or keep the positions shared with the cached sequence and prefill
    the rest; ``prefix`` then describes the new sequence."""
    if keys is None or prefix is None:
        return backend.prefill(segments)
    keep = prefix.usable(keys) if backend.n_past == len(prefix.keys) else 0  # else: driven by others
    prefix.invalidate()  # until the backend holds the new sequence
    if keep:
        logits = backend.prefill_from(keep, drop_positions(segments, keep))
        prefix.hits += 1
        prefix.reused_tokens += keep
    else:
        logits = backend.prefill(segments)
    prefix.keys = list(keys)
    report.prefix_reused = keep
    return logits
