"""Image preprocessing settings (a plain dataclass, shared by training, export and the runtime)."""
from __future__ import annotations

from dataclasses import dataclass

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MOBILEVLM_PAD = (122, 116, 104)  # the CLIP mean as 8-bit RGB, MobileVLM's pad colour


@dataclass
class PreprocessConfig:
    """How a PIL image becomes ``pixel_values``: optional pad to square, resize the shortest side to
    ``image_size`` (``resample``), centre crop to ``image_size`` square, scale to [0, 1], normalise."""

    image_size: int = 336
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    pad_to_square: bool = True
    pad_color: tuple[int, int, int] = MOBILEVLM_PAD
    resample: str = "bicubic"  # bicubic | bilinear | nearest
