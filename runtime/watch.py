"""The watch loop: a standing question asked about a video's frames, one result per frame taken.

    for r in rt.watch("/dev/video0", "Is anyone at the door?", every_s=1.0):
        print(r.to_json())

Frames (``runtime.video``): a file is sampled exactly in source time (``every_s``; None: every frame)
unless ``realtime``; a stream URL, a camera, or a file with ``realtime=True`` is read live, newest
frame first, and each result says how many frames it ``dropped`` (decoded but never asked about).
Live, ``every_s`` is the least wall time between questions.

Per frame: the frame is scaled to a 32x32 RGB thumbnail; with ``min_change`` > 0, a frame whose mean
absolute difference from the last frame asked about is below it is not asked again (the result repeats
the last answer, ``asked`` False, no model time). ``frames`` = K > 1 asks about the last K frames
asked about in one prompt (K ``<image>``; the first answer comes once K frames are in).
The runtime's caches are reused across frames: its image cache returns the visual tokens of a frame
seen before (a repeated frame, and the K-1 older frames of a window), and with ``prefix_reuse`` the
template's text before the first image is not prefilled again.

Bounds (memory stays flat however long it runs): one decoded frame in the live buffer, K frames'
pixel values in the window, one thumbnail and one answer kept between frames, no history and no
per-frame log; the image cache is bounded in bytes (``Runtime(image_cache_mb=...)``).
"""
from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np
from PIL import Image

from .errors import ContextLengthError, EdgeVLMError
from .generate import GenerationConfig, generate
from .video import (DEFAULT_MAX_SIDE, DEFAULT_TIMEOUT_S, Frame, LiveFrames, VideoError, exact_frames,
                    source_kind)

THUMB_SIDE = 32  # the change measure's RGB thumbnail side, pixels
TIMING_KEYS = ("vision_ms", "prefill_ms", "ttft_ms", "decode_tok_s", "total_ms")


@dataclass
class WatchResult:
    index: int  # the frame's decode index in the source
    time_s: float  # the frame's source timestamp
    wall_time: float  # Unix time the answer was ready
    answer: str
    asked: bool  # False: unchanged frame, the last answer repeated without running the model
    change: float | None  # mean |difference| (0-255) from the last frame asked about; None for the first
    dropped: int  # frames decoded since the previous result and never asked about (live sources)
    frames: list[int]  # indices of the frames in the prompt (the last K asked about)
    timings: dict = field(default_factory=dict)  # vision, prefill, ttft, decode, total (ms; tok/s)
    cache: dict = field(default_factory=dict)  # images_cached, images_encoded, prefix_reused
    frame: Frame | None = field(default=None, repr=False)  # the frame itself (not in to_dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("frame")
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def thumbnail(image: np.ndarray) -> np.ndarray:
    """The change measure's input: the frame box-filtered to ``THUMB_SIDE`` square, RGB float32
    (colour kept: a red and a green shape can have the same grey)."""
    small = Image.fromarray(image).resize((THUMB_SIDE, THUMB_SIDE), Image.BOX)
    return np.asarray(small, dtype=np.float32)  # [T, T, 3]


def frame_change(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two thumbnails over pixels and channels, 0-255."""
    return float(np.abs(a - b).mean())


def check_window(rt, prompt: str, k: int) -> None:
    """Refuse a window of ``k`` frames that cannot fit the model's context with the prompt."""
    if k < 1:
        raise EdgeVLMError(f"frames must be >= 1, got {k}")
    n_visual = rt.manifest.model.n_visual_tokens
    n_text = len(rt.processor.prompt_ids(prompt, k)) - k
    n_ctx = rt.backend.n_ctx
    if k * n_visual + n_text >= n_ctx:
        fit = max(0, (n_ctx - n_text - 1) // max(n_visual, 1))
        raise ContextLengthError(f"{k} frames take {k * n_visual} visual tokens + {n_text} prompt tokens, over "
                                 f"this model's context of {n_ctx} positions; at most {fit} frame(s) fit")


def _frames(source: str, every_s: float | None, realtime: bool | None, max_side: int,
            timeout_s: float) -> Iterator[tuple[Frame, int]]:
    """(frame, dropped) pairs: exact sampling for a file, else the live newest-frame-wins reader,
    taking at most one frame per ``every_s`` seconds of wall time."""
    live = realtime if realtime is not None else source_kind(source) != "file"
    if not live:
        yield from ((f, 0) for f in exact_frames(source, every_s, max_side, timeout_s))
        return
    with LiveFrames(source, realtime=realtime, max_side=max_side, timeout_s=timeout_s) as reader:
        next_at = 0.0
        while True:
            if every_s:
                time.sleep(max(0.0, next_at - time.monotonic()))
                next_at = time.monotonic() + every_s
            try:
                got = reader.take(timeout=timeout_s)
            except TimeoutError:
                raise VideoError(f"{source}: no new frame for {timeout_s:g} s (the stream stalled)") from None
            if got is None:
                return
            yield got


def watch(rt, source: str, prompt: str, every_s: float | None = None, fps: float | None = None,
          frames: int = 1, min_change: float = 0.0, realtime: bool | None = None, max_answers: int | None = None,
          max_new_tokens: int = 32, max_side: int = DEFAULT_MAX_SIDE, timeout_s: float = DEFAULT_TIMEOUT_S,
          **gen: Any) -> Iterator[WatchResult]:
    """Results for ``source``'s frames (see the module docstring); ``fps`` = 1 / ``every_s``.
    ``gen``: GenerationConfig fields (``do_sample``, ``temperature``, ``stop`` ...)."""
    if fps is not None and every_s is not None:
        raise EdgeVLMError("give every_s or fps, not both")
    if fps is not None and fps <= 0 or every_s is not None and every_s < 0:
        raise EdgeVLMError("fps must be > 0 and every_s >= 0")
    every_s = 1.0 / fps if fps is not None else every_s
    check_window(rt, prompt, frames)
    config = GenerationConfig(max_new_tokens=max_new_tokens, **gen)
    config.validate()
    ids = rt.processor.prompt_ids(prompt, frames)
    window: deque = deque(maxlen=frames)  # (index, pixels [1, 3, S, S]) of the frames asked about
    last_thumb, last_answer, n, dropped = None, "", 0, 0
    for frame, d in _frames(source, every_s, realtime, max_side, timeout_s):
        dropped += d
        thumb = thumbnail(frame.image)
        change = None if last_thumb is None else frame_change(thumb, last_thumb)
        asked = change is None or min_change <= 0 or change >= min_change
        timings, cache = {}, {}
        if asked:
            last_thumb = thumb
            window.append((frame.index, rt.pixel_values(Image.fromarray(frame.image))))
            if len(window) < frames:
                continue
            pixels = np.concatenate([p for _, p in window])  # [K, 3, S, S]
            result = generate(rt.backend, rt.tokenizer, ids, pixels, config, rt.caches)
            last_answer = result.text
            timings = {k: result.timings.to_dict()[k] for k in TIMING_KEYS}
            cache = result.cache.to_dict()
        elif len(window) < frames:
            continue
        yield WatchResult(frame.index, frame.time_s, time.time(), last_answer, asked, change, dropped,
                          [i for i, _ in window], timings, cache, frame)
        dropped, n = 0, n + 1
        if max_answers is not None and n >= max_answers:
            return
