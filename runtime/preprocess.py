"""Image loading and preprocessing in numpy + Pillow: the one definition that training and every
runtime use.

``preprocess_image`` reproduces ``transformers.CLIPImageProcessor`` (shortest-edge resize with PIL,
centre crop, rescale, normalise) to within float32 rounding, after LLaVA's optional
``expand2square`` padding. Training's ``preprocess`` wraps this function, so a phone computes the
numbers training saw.

Mode conversion (``to_rgb``) is PIL's ``convert("RGB")`` -- what CLIPImageProcessor's
``do_convert_rgb`` does -- so alpha is dropped, not composited (RGBA/LA/PA/P-with-transparency keep
the colour under the alpha). The one exception is 16/32-bit integer greyscale (``I;16*``, ``I``),
which PIL would clip at 255; it is mapped 0..65535 -> 0..255 with ``>> 8`` instead.
"""
from __future__ import annotations

import io
import os
import warnings
from typing import Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import EdgeVLMError, ImageError
from .preprocess_config import PreprocessConfig

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, Image.Image]

DEFAULT_MAX_PIXELS = 64_000_000
RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
_WIDE_INT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)


def _describe(src: object) -> str:
    if isinstance(src, (bytes, bytearray)):
        return f"<{len(src)} bytes>"
    if isinstance(src, Image.Image):
        return f"<PIL image {src.size[0]}x{src.size[1]} {src.mode}>"
    return os.fspath(src)  # type: ignore[arg-type]


def _check_pixels(img: Image.Image, name: str, max_pixels: int) -> None:
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError(
            f"{name}: image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
            "(possible decompression bomb); downscale it or raise max_pixels"
        )
    if w < 1 or h < 1:
        raise ImageError(f"{name}: image has an empty size {w}x{h}")


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy of ``img``: ``convert("RGB")`` except wide integer greyscale, scaled by ``>> 8``."""
    if img.mode in _WIDE_INT_MODES:
        a = np.asarray(img).astype(np.int64)  # [H, W]
        img = Image.fromarray(np.clip(a >> 8, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "RGB":
        return img.copy()
    return img.convert("RGB")


def _exif_upright(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # malformed EXIF from an untrusted file: keep the pixels as stored
        return img


def _decode(img: Image.Image, name: str, max_pixels: int) -> Image.Image:
    """Header check, full decode, EXIF orientation, RGB -- for an opened (lazy) image."""
    _check_pixels(img, name, max_pixels)  # before decoding: the header alone gives the size
    try:
        img.load()  # forces a full decode: truncated data raises here
    except _BOMB_ERRORS as e:
        raise ImageError(f"{name}: image is too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{name}: image data is truncated or corrupt ({e})") from None
    return to_rgb(_exif_upright(img))


def _open(src: str | os.PathLike | bytes | bytearray, name: str) -> Image.Image:
    fp = io.BytesIO(bytes(src)) if isinstance(src, (bytes, bytearray)) else src
    try:
        with warnings.catch_warnings():  # our own max_pixels check governs below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(fp)
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a directory, not an image file") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (or a format Pillow cannot read)") from None
    except _BOMB_ERRORS as e:
        raise ImageError(f"{name}: image is too large (possible decompression bomb: {e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{name}: cannot read image ({e})") from None


def load_image(src: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read an image (path, bytes or PIL image) as a fully decoded, upright RGB ``PIL.Image``.

    Raises ``ImageError`` (one line, naming the file) for a missing file, non-image data, a
    truncated file, or more than ``max_pixels`` pixels (checked from the header, before decoding).
    """
    name = _describe(src)
    if isinstance(src, Image.Image):
        return _decode(src, name, max_pixels)
    img = _open(src, name)
    try:
        return _decode(img, name, max_pixels)
    finally:
        img.close()


def expand_to_square(img: Image.Image, color: Sequence[int]) -> Image.Image:
    """LLaVA's ``expand2square``: centre ``img`` on a square canvas of ``color``."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), tuple(int(c) for c in color))
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def shortest_edge_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the short side ``size``; the long side truncated like transformers'
    ``get_resize_output_image_size``."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (size, new_long) if width <= height else (new_long, size)


def preprocess_image(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """``pixel_values`` float32 [1, 3, S, S] for one image (any mode; converted with ``to_rgb``)."""
    if cfg.resample not in RESAMPLE:
        raise EdgeVLMError(f"unknown resample {cfg.resample!r}; valid: {', '.join(RESAMPLE)}")
    s = int(cfg.image_size)
    img = img if img.mode == "RGB" else to_rgb(img)
    if cfg.pad_to_square:
        img = expand_to_square(img, cfg.pad_color)
    img = img.resize(shortest_edge_size(*img.size, s), resample=RESAMPLE[cfg.resample])
    x = np.asarray(img)  # [H, W, 3] uint8, min(H, W) == S
    top, left = (x.shape[0] - s) // 2, (x.shape[1] - s) // 2
    x = x[top : top + s, left : left + s]  # [S, S, 3]
    # Same arithmetic as CLIPImageProcessor: rescale in float64, cast, normalise in float32.
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(cfg.mean, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])  # [1, 3, S, S]


def preprocess_batch(images: Sequence[Image.Image], cfg: PreprocessConfig) -> np.ndarray:
    """``pixel_values`` float32 [B, 3, S, S] for a list of images."""
    if len(images) == 0:
        raise ImageError("preprocess_batch needs at least one image")
    return np.concatenate([preprocess_image(im, cfg) for im in images], axis=0)
