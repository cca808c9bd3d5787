"""ShapesVQA: a built-in synthetic visual question answering dataset in LLaVA format.

Images hold 1-4 coloured shapes (some small), sometimes a short text string; questions ask about
colour, shape, count, position, existence and text, with short lowercase answers from small
closed sets (exact-match evaluation). Every image and record derives from its own
``random.Random(f"shapes-vqa/{seed}/{split}/{idx}")``, so output is byte-identical for a seed
whatever the number of workers.

On disk (``out_dir``)::

    images/{split}_{idx:06d}.png      RGB PNG, image_size x image_size
    train.json val.json test.json     LLaVA records + "qa_meta" (one {"type", "small"} per QA pair)
    captions.json                     stage-1 data: human "<image>\\n", gpt caption (train images)

Train records have up to 8 QA pairs (usually 5-8) of mixed types; val/test records have one pair, with the
question types in equal rotation.
"""
from __future__ import annotations

import functools
import json
import multiprocessing
import os
import random
from typing import Iterable, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from edgevlm.runtime.chat import IMAGE_TOKEN, TEMPLATES
from edgevlm.runtime.errors import EdgeVLMError
from edgevlm.train.data.shapes_questions import (
    ASKERS, COLOURS, KINDS, MAX_SHAPES, QA, QA_TYPES, TEXT_ALPHABET, Scene, Shape, caption,
    multi_turn_qas,
)

SPLITS = ("train", "val", "test")
REF_SIDE = 336  # sizes below are in pixels at this side and scale with image_size
PALETTE = {
    "red": (220, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 225),
    "yellow": (240, 205, 25), "purple": (140, 60, 185), "orange": (245, 135, 20),
}
SMALL_RANGE, LARGE_RANGE = (20, 35), (50, 110)
P_SMALL, P_TEXT = 0.22, 0.3
P_REUSE_COLOUR, P_REUSE_KIND = 0.35, 0.3  # repeats make count questions less lopsided
MIDLINE_GAP, SHAPE_GAP = 20, 6  # centres keep off the midlines; boxes keep apart
TEXT_PX = (32, 56)


@functools.lru_cache(maxsize=64)
def _font(px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=px)


def _overlaps(box: tuple, boxes: list, gap: float) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] + gap and b[0] < x1 + gap and y0 < b[3] + gap and b[1] < y1 + gap
               for b in boxes)


def _place_text(rng: random.Random, side: int, boxes: list) -> Optional[tuple]:
    scale = side / REF_SIDE
    text = "".join(rng.choice(TEXT_ALPHABET) for _ in range(rng.randint(1, 2)))
    px = max(8, round(rng.randint(*TEXT_PX) * scale))
    l, t, r, b = _font(px).getbbox(text)
    w, h = r - l, b - t
    for _ in range(50):
        x0, y0 = rng.randint(4, side - w - 4), rng.randint(4, side - h - 4)
        box = (x0, y0, x0 + w, y0 + h)
        if not _overlaps(box, boxes, SHAPE_GAP * scale):
            return text, box, px
    return None


def _pick_colour_kind(rng: random.Random, shapes: list[Shape]) -> tuple[str, str]:
    used = {(s.colour, s.kind) for s in shapes}
    while True:
        if shapes and rng.random() < P_REUSE_COLOUR:
            colour = rng.choice(shapes).colour
        else:
            colour = rng.choice(COLOURS)
        if shapes and rng.random() < P_REUSE_KIND:
            kind = rng.choice(shapes).kind
        else:
            kind = rng.choice(KINDS)
        if (colour, kind) not in used:  # colour + kind names every shape uniquely
            return colour, kind


def _place_shape(rng: random.Random, side: int, boxes: list, colour: str, kind: str):
    scale = side / REF_SIDE
    small = rng.random() < P_SMALL
    size = max(4, round(rng.randint(*(SMALL_RANGE if small else LARGE_RANGE)) * scale))
    half, mid, gap = size / 2, side / 2, MIDLINE_GAP * scale
    lo, hi = int(half) + 3, int(side - half) - 3
    for _ in range(60):
        cx, cy = rng.randint(lo, hi), rng.randint(lo, hi)
        if abs(cx - mid) < gap or abs(cy - mid) < gap:
            continue  # keep the quadrant unambiguous
        box = (cx - half, cy - half, cx + half, cy + half)
        if _overlaps(box, boxes, SHAPE_GAP * scale):
            continue
        rgb = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in PALETTE[colour])
        angle = rng.uniform(0, 72) if kind == "star" else 0.0
        return Shape(kind, colour, cx, cy, size, small, rgb, angle), box
    return None


def sample_scene(rng: random.Random, side: int = REF_SIDE, need_text: bool = False) -> Scene:
    """A random scene: background, optional text (placed first), then 1-4 shapes."""
    tint = rng.randint(-8, 8)
    base = rng.randint(205, 245)
    scene = Scene(side=side, bg_rgb=(base + tint, base, base - tint),
                  bg_style=rng.choice(("plain", "plain", "gradient", "blotch")),
                  bg_seed=rng.getrandbits(32))
    boxes: list = []
    if need_text or rng.random() < P_TEXT:
        placed = _place_text(rng, side, boxes)
        if placed is not None:
            scene.text, scene.text_box, scene.text_px = placed
            boxes.append(scene.text_box)
    for _ in range(rng.randint(1, MAX_SHAPES)):
        colour, kind = _pick_colour_kind(rng, scene.shapes)
        placed = _place_shape(rng, side, boxes, colour, kind)
        if placed is not None:  # a crowded image just gets fewer shapes
            scene.shapes.append(placed[0])
            boxes.append(placed[1])
    return scene


def _background(scene: Scene) -> Image.Image:
    side = scene.side
    base = np.array(scene.bg_rgb, dtype=np.float32)  # [3]
    if scene.bg_style == "plain":
        return Image.new("RGB", (side, side), tuple(int(c) for c in base))
    gen = np.random.default_rng(scene.bg_seed)
    if scene.bg_style == "gradient":
        ramp = np.linspace(-1.0, 1.0, side, dtype=np.float32) * gen.uniform(6, 16)  # [S]
        field = ramp[:, None] if gen.random() < 0.5 else ramp[None, :]  # [S, 1] or [1, S]
        field = np.broadcast_to(field, (side, side))  # [S, S]
    else:  # blotch: low-frequency noise, upsampled
        coarse = gen.uniform(-10, 10, size=(6, 6)).astype(np.float32)
        field = np.asarray(Image.fromarray(coarse, mode="F").resize((side, side), Image.BILINEAR))
    pix = np.clip(base[None, None, :] + field[:, :, None], 0, 255).astype(np.uint8)  # [S, S, 3]
    return Image.fromarray(pix, mode="RGB")


def _star(cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    pts = []
    for i in range(10):
        rad = r if i % 2 == 0 else r * 0.45
        a = np.deg2rad(angle + 36 * i - 90)
        pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
    return pts


def draw_shape(draw: ImageDraw.ImageDraw, s: Shape) -> None:
    """Fill shape ``s`` with ``s.rgb`` (an RGB tuple, or one int on an "L" image: probe.py draws class ids)."""
    h = s.size / 2
    x0, y0, x1, y1 = s.cx - h, s.cy - h, s.cx + h, s.cy + h
    if s.kind == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=s.rgb)
    elif s.kind == "square":
        draw.rectangle((x0, y0, x1, y1), fill=s.rgb)
    elif s.kind == "triangle":
        draw.polygon([(s.cx, y0), (x1, y1), (x0, y1)], fill=s.rgb)
    else:
        draw.polygon(_star(s.cx, s.cy, h, s.angle), fill=s.rgb)


def render_scene(scene: Scene) -> Image.Image:
    """The scene as an RGB image of side ``scene.side``."""
    img = _background(scene)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        draw_shape(draw, s)
    if scene.text:
        font = _font(scene.text_px)
        l, t, _, _ = font.getbbox(scene.text)
        x0, y0 = scene.text_box[:2]
        draw.text((x0 - l, y0 - t), scene.text, font=font, fill=(25, 25, 25))
    return img


def make_item(seed: int, split: str, idx: int, side: int = REF_SIDE) -> tuple[Scene, list[QA]]:
    """The scene and its QA pairs for one record (no pixels)."""
    rng = random.Random(f"shapes-vqa/{seed}/{split}/{idx}")
    if split == "train":
        scene = sample_scene(rng, side)
        return scene, multi_turn_qas(scene, rng)
    qtype = QA_TYPES[idx % len(QA_TYPES)]  # val/test: one question, types in rotation
    while True:
        scene = sample_scene(rng, side, need_text=(qtype == "text"))
        qa = ASKERS[qtype](scene, rng)
        if qa is not None:
            return scene, [qa]


def _record(rid: str, image: str, qas: list[QA]) -> dict:
    conv = []
    for i, (q, a, _) in enumerate(qas):
        conv.append({"from": "human", "value": (IMAGE_TOKEN + "\n" if i == 0 else "") + q})
        conv.append({"from": "gpt", "value": a})
    return {"id": rid, "image": image, "conversations": conv, "qa_meta": [m for *_, m in qas]}


def _caption_record(rid: str, image: str, scene: Scene) -> dict:
    conv = [{"from": "human", "value": IMAGE_TOKEN + "\n"}, {"from": "gpt", "value": caption(scene)}]
    return {"id": rid, "image": image, "conversations": conv,
            "qa_meta": [{"type": "caption", "small": any(s.small for s in scene.shapes)}]}


def _build_one(job: tuple) -> tuple[dict, Optional[dict]]:
    out_dir, seed, split, idx, side = job
    scene, qas = make_item(seed, split, idx, side)
    rid = f"{split}_{idx:06d}"
    image = f"images/{rid}.png"
    render_scene(scene).save(os.path.join(out_dir, image), format="PNG", compress_level=1)
    cap = _caption_record(rid, image, scene) if split == "train" else None
    return _record(rid, image, qas), cap


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def _check_args(counts: dict, image_size: int, workers: int) -> None:
    for name, n in counts.items():
        if not isinstance(n, int) or n < 0:
            raise EdgeVLMError(f"ShapesVQA: n_{name} must be a non-negative integer, got {n!r}")
    if not isinstance(image_size, int) or image_size < 64:
        raise EdgeVLMError(f"ShapesVQA: image_size must be an integer >= 64, got {image_size!r}")
    if not isinstance(workers, int) or workers < 1:
        raise EdgeVLMError(f"ShapesVQA: workers must be a positive integer, got {workers!r}")


def _run_jobs(jobs: list, workers: int, progress: bool) -> Iterable:
    from tqdm.auto import tqdm

    bar = dict(total=len(jobs), desc="ShapesVQA images", unit="img", disable=not progress)
    if workers == 1:
        yield from tqdm(map(_build_one, jobs), **bar)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from tqdm(pool.imap(_build_one, jobs, chunksize=32), **bar)


def generate_shapes_vqa(out_dir: str, n_train: int = 4000, n_val: int = 300, n_test: int = 600,
                        seed: int = 0, image_size: int = REF_SIDE, progress: bool = True,
                        workers: int = 1) -> dict:
    """Write ShapesVQA to ``out_dir`` (see the module docstring); returns paths and counts."""
    counts = {"train": n_train, "val": n_val, "test": n_test}
    _check_args(counts, image_size, workers)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    jobs = [(out_dir, seed, split, i, image_size) for split in SPLITS for i in range(counts[split])]
    records: dict[str, list] = {s: [] for s in SPLITS}
    captions: list[dict] = []
    for rec, cap in _run_jobs(jobs, workers, progress):
        records[rec["id"].split("_")[0]].append(rec)
        if cap is not None:
            captions.append(cap)
    paths = {s: os.path.join(out_dir, f"{s}.json") for s in SPLITS}
    paths["captions"] = os.path.join(out_dir, "captions.json")
    for s in SPLITS:
        write_json_atomic(paths[s], records[s])
    write_json_atomic(paths["captions"], captions)
    return {"out_dir": out_dir, "images_dir": os.path.join(out_dir, "images"), "paths": paths,
            "counts": {**counts, "captions": len(captions)}, "seed": seed, "image_size": image_size}


def shapes_text_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Texts of ``n`` ShapesVQA train items, for tokenizer training; renders no image.

    Per item: each turn as the vicuna_v1 template renders it (system prompt, USER, ASSISTANT;
    ``<image>`` and ``</s>`` never reach the tokenizer as text, so they are left out) and the
    caption.
    """
    template = TEMPLATES["vicuna_v1"]
    out: list[str] = []
    for idx in range(n):
        scene, qas = make_item(seed, "train", idx)
        for i, (q, a, _) in enumerate(qas):
            q = "\n" + q if i == 0 else q  # the text after "<image>" in the first turn
            out.append(f"{template.prompt_text(q, first=(i == 0))} {a}")
        out.append(caption(scene))
    return out
