"""runtime.preprocess: loading (modes, EXIF, errors) and equality with CLIPImageProcessor."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from edgevlm.runtime.errors import EdgeVLMError, ImageError
from edgevlm.runtime.preprocess import (
    load_image,
    preprocess_batch,
    preprocess_image,
    to_rgb,
)
from edgevlm.runtime.preprocess_config import CLIP_MEAN, CLIP_STD, PreprocessConfig

S = 37  # odd on purpose
SIZES = [(337, 211), (1, 500), (999, 998)]
MODES = ["RGB", "RGBA", "L", "P", "I;16", "CMYK"]


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def make_image(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A random image of ``mode``, round-tripped through its file format where that matters."""
    w, h = size
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if mode == "RGB":
        return Image.fromarray(rgb)
    if mode == "RGBA":
        return Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (h, w), dtype=np.uint8)]))
    if mode == "L":
        return Image.fromarray(rgb[..., 0])
    if mode == "P":
        pal = Image.fromarray(rgb).quantize(colors=16)
        pal.info["transparency"] = 3
        return Image.open(io.BytesIO(_png_bytes(pal)))
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
        out = Image.open(io.BytesIO(_png_bytes(img)))
        assert out.mode == "I;16"
        return out
    if mode == "CMYK":
        buf = io.BytesIO()
        Image.fromarray(rgb).convert("CMYK").save(buf, "JPEG", quality=95)
        out = Image.open(io.BytesIO(buf.getvalue()))
        assert out.mode == "CMYK"
        return out
    raise AssertionError(mode)


def expand2square(pil_img: Image.Image, background_color: tuple[int, ...]) -> Image.Image:
    """LLaVA / MobileVLM's padding, written out as they do it."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    if width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


def clip_reference(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    transformers = pytest.importorskip("transformers")
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
    proc = transformers.CLIPImageProcessor(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
        image_mean=list(cfg.mean),
        image_std=list(cfg.std),
        resample=resample[cfg.resample],
        do_convert_rgb=True,
    )
    if img.mode in ("I;16", "I"):
        img = to_rgb(img)  # documented deviation: PIL's convert("RGB") would clip at 255
    if cfg.pad_to_square:
        bg = tuple(int(x * 255) for x in proc.image_mean)
        assert bg == tuple(cfg.pad_color)
        img = expand2square(img.convert("RGB"), bg)
    return proc(images=img, return_tensors="np")["pixel_values"]


@pytest.mark.parametrize("pad", [False, True], ids=["crop", "pad"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mode", MODES)
def test_matches_clip_image_processor(mode, size, pad):
    img = make_image(mode, size)
    cfg = PreprocessConfig(image_size=S, pad_to_square=pad)
    ours = preprocess_image(img, cfg)
    ref = clip_reference(img, cfg)
    assert ours.shape == ref.shape == (1, 3, S, S) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("resample", ["bilinear", "nearest"])
def test_other_resample_filters_match(resample):
    img = make_image("RGB", (123, 77), seed=1)
    cfg = PreprocessConfig(image_size=S, pad_to_square=False, resample=resample)
    np.testing.assert_allclose(preprocess_image(img, cfg), clip_reference(img, cfg), atol=1e-5)


def test_full_size_336_default_config():
    img = make_image("RGB", (640, 481), seed=2)
    cfg = PreprocessConfig()
    np.testing.assert_allclose(preprocess_image(img, cfg), clip_reference(img, cfg), atol=1e-5)


def test_unknown_resample_is_user_error():
    with pytest.raises(EdgeVLMError, match="resample"):
        preprocess_image(
            make_image("RGB", (8, 8)), PreprocessConfig(image_size=4, resample="lanczos9")
        )


def test_batch_stacks_single_images():
    cfg = PreprocessConfig(image_size=S)
    imgs = [make_image("RGB", (50, 30), seed=i) for i in range(3)]
    batch = preprocess_batch(imgs, cfg)
    assert batch.shape == (3, 3, S, S) and batch.dtype == np.float32
    for i, im in enumerate(imgs):
        np.testing.assert_array_equal(batch[i : i + 1], preprocess_image(im, cfg))
    with pytest.raises(ImageError):
        preprocess_batch([], cfg)


def test_normalisation_of_a_flat_image():
    cfg = PreprocessConfig(image_size=5, pad_to_square=False)
    x = preprocess_image(Image.new("RGB", (9, 7), (255, 0, 128)), cfg)
    expect = (np.array([255, 0, 128]) / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(x[0, :, 2, 2], expect, atol=1e-5)


# --- load_image ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_load_image_returns_rgb_for_every_mode(mode, tmp_path):
    img = make_image(mode, (21, 13))
    path = tmp_path / f"x.{'jpg' if mode == 'CMYK' else 'png'}"
    img.save(path)
    for src in (path, str(path), path.read_bytes(), Image.open(path)):
        out = load_image(src)
        assert out.mode == "RGB" and out.size == (21, 13)


def test_sixteen_bit_is_scaled_not_clipped():
    vals = np.array([[0, 255, 256, 4095, 32768, 65535]], dtype=np.uint16)
    img = Image.open(io.BytesIO(_png_bytes(Image.fromarray(vals))))
    out = np.asarray(load_image(img))
    np.testing.assert_array_equal(out[0, :, 0], [0, 0, 1, 15, 128, 255])
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_rgba_alpha_is_dropped_like_convert_rgb():
    img = Image.new("RGBA", (4, 4), (200, 100, 50, 0))
    assert load_image(img).getpixel((0, 0)) == (200, 100, 50)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    out = load_image(buf.getvalue())
    assert out.size == (20, 40)
    r, g, b = out.getpixel((10, 3))  # the left strip is now at the top
    assert b > 200 and r < 60


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_bytes(b"this is not a picture at all")
    with pytest.raises(ImageError, match="notes.png.*not an image"):
        load_image(path)
    with pytest.raises(ImageError, match="not an image"):
        load_image(b"\x00\x01\x02garbage")


def test_truncated_jpeg(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        buf, "JPEG"
    )
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="cut.jpg.*truncated"):
        load_image(path)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (1-bit grey) with one tiny IDAT: decoding it fully
    would need a huge buffer (and fail as truncated); a header check refuses it at once."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_refused_from_header(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(30000, 30000))
    with pytest.raises(ImageError, match="bomb.png.*(too large|decompression bomb)"):
        load_image(path)


def test_max_pixels_checked_before_decoding():
    # 9000x9000 is under Pillow's own bomb limit, over ours; the data is bogus, so only a header
    # check (not a decode) can produce the "pixels" message.
    with pytest.raises(ImageError, match="9000x9000 = 81000000 pixels"):
        load_image(_png_header_only(9000, 9000))
    with pytest.raises(ImageError, match="over the limit of 100"):
        load_image(make_image("RGB", (11, 10)), max_pixels=100)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="nope.jpg.*no such file"):
        load_image(tmp_path / "nope.jpg")
