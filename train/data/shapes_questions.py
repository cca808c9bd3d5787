"""ShapesVQA scenes as plain data, and the questions, answers and captions they support.

Nothing here touches pixels: ``shapes.py`` samples and renders scenes, and the tokenizer corpus
is built from the same functions without rendering. Each ``ask_*`` function picks what to ask
with the caller's ``random.Random`` so that answers come out balanced, and returns ``None`` when
the scene cannot support an unambiguous question of its type.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
KINDS = ("circle", "square", "triangle", "star")
QA_TYPES = ("colour", "shape", "count", "position", "existence", "text")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
YES_NO = ("yes", "no")
MAX_SHAPES = 4
# Rendered text strings use these characters only (no confusable l/1/i/o/0/j).
TEXT_ALPHABET = "23456789abcdefghkmnpqrstuvwxyz"
# Closed answer set per question type (None: open, the rendered text string).
ANSWER_SETS: dict[str, Optional[tuple[str, ...]]] = {
    "colour": COLOURS,
    "shape": KINDS,
    "count": tuple(str(i) for i in range(MAX_SHAPES + 1)),
    "position": QUADRANTS + YES_NO,
    "existence": YES_NO,
    "text": None,
}
RELATIONS = ("left of", "right of", "above", "below")
RELATION_MIN_GAP = 24 / 336  # centres closer than this (fraction of the side) are not compared

QA = tuple[str, str, dict]  # (question, answer, qa_meta)


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    cx: int  # centre, pixels
    cy: int
    size: int  # bounding-box side, pixels
    small: bool
    rgb: tuple[int, int, int] = (0, 0, 0)  # jittered fill colour (rendering only)
    angle: float = 0.0  # rotation of stars, degrees (rendering only)


@dataclass
class Scene:
    side: int  # image width == height, pixels
    shapes: list[Shape] = field(default_factory=list)
    text: Optional[str] = None
    text_box: Optional[tuple[int, int, int, int]] = None  # ink box x0, y0, x1, y1
    text_px: int = 0  # font size
    bg_rgb: tuple[int, int, int] = (230, 230, 230)
    bg_style: str = "plain"  # plain | gradient | blotch
    bg_seed: int = 0


def quadrant(shape: Shape, side: int) -> str:
    vert = "top" if shape.cy < side / 2 else "bottom"
    horiz = "left" if shape.cx < side / 2 else "right"
    return f"{vert} {horiz}"


def _an(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _meta(qtype: str, small: bool) -> dict:
    return {"type": qtype, "small": bool(small)}


def ask_colour(scene: Scene, rng: random.Random) -> Optional[QA]:
    kinds = Counter(s.kind for s in scene.shapes)
    cands = [s for s in scene.shapes if kinds[s.kind] == 1]
    if not cands:
        return None
    s = rng.choice(cands)
    q = rng.choice(("What colour is the {}?", "What is the colour of the {}?")).format(s.kind)
    return q, s.colour, _meta("colour", s.small)


def ask_shape(scene: Scene, rng: random.Random) -> Optional[QA]:
    colours = Counter(s.colour for s in scene.shapes)
    cands = [s for s in scene.shapes if colours[s.colour] == 1]
    if not cands:
        return None
    s = rng.choice(cands)
    q = rng.choice(("What shape is the {} object?", "What is the shape of the {} object?"))
    return q.format(s.colour), s.kind, _meta("shape", s.small)


def ask_count(scene: Scene, rng: random.Random) -> Optional[QA]:
    shapes = scene.shapes
    mode = rng.choices(("all", "colour", "kind"), weights=(2, 1, 1))[0]
    if mode == "all":
        q = rng.choice(("How many shapes are there?", "How many objects are in the image?"))
        return q, str(len(shapes)), _meta("count", any(s.small for s in shapes))
    values = COLOURS if mode == "colour" else KINDS
    attr = "colour" if mode == "colour" else "kind"
    counts = {v: sum(getattr(s, attr) == v for s in shapes) for v in values}
    by_answer: dict[int, list[str]] = {}
    for v, c in counts.items():
        by_answer.setdefault(c, []).append(v)
    # Pick the answer first, favouring larger counts (most colours/kinds are absent or single).
    options = sorted(by_answer)
    answer = rng.choices(options, weights=[max(c, 1) ** 2 for c in options])[0]
    v = rng.choice(by_answer[answer])
    q = f"How many {v} shapes are there?" if mode == "colour" else f"How many {v}s are there?"
    small = any(s.small for s in shapes if getattr(s, attr) == v)
    return q, str(answer), _meta("count", small)


def _relation_holds(rel: str, a: Shape, b: Shape) -> bool:
    return {"left of": a.cx < b.cx, "right of": a.cx > b.cx,
            "above": a.cy < b.cy, "below": a.cy > b.cy}[rel]


def _ask_relation(scene: Scene, rng: random.Random) -> Optional[QA]:
    rel = rng.choice(RELATIONS)
    horizontal = rel in ("left of", "right of")
    gap = RELATION_MIN_GAP * scene.side
    pairs = [(a, b) for a in scene.shapes for b in scene.shapes if a is not b
             and abs((a.cx - b.cx) if horizontal else (a.cy - b.cy)) >= gap]
    if not pairs:
        return None
    # Each unordered pair gives one "yes" and one "no" order, so both pools are non-empty.
    want = rng.random() < 0.5
    pool = [p for p in pairs if _relation_holds(rel, *p) == want]
    a, b = rng.choice(pool)
    q = f"Is the {a.colour} {a.kind} {rel} the {b.colour} {b.kind}?"
    return q, "yes" if want else "no", _meta("position", a.small or b.small)


def ask_position(scene: Scene, rng: random.Random) -> Optional[QA]:
    if len(scene.shapes) >= 2 and rng.random() < 0.35:
        qa = _ask_relation(scene, rng)
        if qa is not None:
            return qa
    s = rng.choice(scene.shapes)
    q = rng.choice(("Where is the {} {}?", "In which part of the image is the {} {}?"))
    return q.format(s.colour, s.kind), quadrant(s, scene.side), _meta("position", s.small)


def ask_existence(scene: Scene, rng: random.Random) -> Optional[QA]:
    if rng.random() < 0.5:
        s = rng.choice(scene.shapes)
        colour, kind, answer, small = s.colour, s.kind, "yes", s.small
    else:
        present = {(s.colour, s.kind) for s in scene.shapes}
        absent = [(c, k) for c in COLOURS for k in KINDS if (c, k) not in present]
        # Hard negatives: the colour or the kind is in the image, just not together.
        hard = [(c, k) for c, k in absent
                if any(c == s.colour or k == s.kind for s in scene.shapes)]
        colour, kind = rng.choice(hard if hard and rng.random() < 0.7 else absent)
        answer, small = "no", False
    return f"Is there {_an(colour)} {kind}?", answer, _meta("existence", small)


def ask_text(scene: Scene, rng: random.Random) -> Optional[QA]:
    if not scene.text:
        return None
    q = rng.choice(("What text is written in the image?", "What does the text in the image say?"))
    return q, scene.text, _meta("text", False)


ASKERS: dict[str, Callable[[Scene, random.Random], Optional[QA]]] = {
    "colour": ask_colour,
    "shape": ask_shape,
    "count": ask_count,
    "position": ask_position,
    "existence": ask_existence,
    "text": ask_text,
}


def multi_turn_qas(scene: Scene, rng: random.Random, lo: int = 5, hi: int = 8) -> list[QA]:
    """lo-hi questions about one image, every supported type first, then more of random types
    (no question asked twice). Many questions per image give the vision tower more supervision
    per forward pass, which is what makes training from scratch on 2 cores feasible."""
    want = rng.randint(lo, hi)
    order = list(QA_TYPES)
    rng.shuffle(order)
    out: list[QA] = []
    seen: set[str] = set()
    for attempt in range(8 * hi):
        qtype = order[attempt] if attempt < len(order) else rng.choice(QA_TYPES)
        qa = ASKERS[qtype](scene, rng)
        if qa is not None and qa[0] not in seen:
            seen.add(qa[0])
            out.append(qa)
        if len(out) == want:
            break
    return out


def size_word(shape: Shape, side: int) -> str:
    if shape.small:
        return "small"
    return "medium" if shape.size < 80 * side / 336 else "large"


def caption(scene: Scene) -> str:
    """'a large red circle at the top left and a small blue square at the bottom right.'"""
    half = scene.side / 2
    shapes = sorted(scene.shapes, key=lambda s: (s.cy >= half, s.cx, s.cy))
    parts = [f"a {size_word(s, scene.side)} {s.colour} {s.kind} at the {quadrant(s, scene.side)}"
             for s in shapes]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    if scene.text:
        text += f', with the text "{scene.text}"'
    return text + "."
