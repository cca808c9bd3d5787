"""A synthetic ShapesVQA video: one scene whose shapes change colour at known times (for ``edgevlm watch``).

Example: python -m edgevlm.train.data.shapes_video --out runs/tiny/watch.mp4 --seconds 4 --fps 5 --hold 1

The scene is ShapesVQA test item ``--item`` (its shapes and background, drawn by the dataset's own
renderer); every ``--hold`` seconds all its shapes take the next colour of the palette, so frame ``i``
shows ``colour_at(i / fps)``. Encoded with PyAV (``mpeg4`` in .mp4 by default; ``ffv1`` in .mkv is lossless).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from fractions import Fraction

import numpy as np

from edgevlm.train.data.shapes import PALETTE, REF_SIDE, make_item, render_scene
from edgevlm.train.data.shapes_questions import COLOURS


def scene_frames(item: int = 0, side: int = REF_SIDE, n_colours: int = len(COLOURS), seed: int = 0):
    """(scene question, [RGB uint8 [side, side, 3] per colour], colours): the test scene ``item``
    drawn with all its shapes in each of the first ``n_colours`` palette colours."""
    scene, _ = make_item(seed, "test", item, side)
    kind = scene.shapes[0].kind
    images = []
    for colour in COLOURS[:n_colours]:
        shapes = [dataclasses.replace(s, colour=colour, rgb=PALETTE[colour]) for s in scene.shapes]
        images.append(np.asarray(render_scene(dataclasses.replace(scene, shapes=shapes))))
    return f"What colour is the {kind}?", images, list(COLOURS[:n_colours])


def colour_index(t: float, hold_s: float, n_colours: int) -> int:
    """Which colour the video shows at ``t`` seconds."""
    return int(t // hold_s + 1e-9) % n_colours


def write_video(out: str, seconds: float = 4.0, fps: int = 5, hold_s: float = 1.0, item: int = 0,
                side: int = REF_SIDE, codec: str = "mpeg4", seed: int = 0, ticker: bool = False) -> dict:
    """Write the video; returns what it shows (question, colours, frame count, the hold).
    ``ticker``: a small corner block changes grey level every frame, so no two frames are alike."""
    import av

    question, images, colours = scene_frames(item, side, seed=seed)
    n_frames = int(round(seconds * fps))
    with av.open(out, mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = side, side
        stream.pix_fmt = "yuv420p"
        if codec == "mpeg4":
            stream.options = {"qscale": "2"}  # near-lossless: static frames decode (almost) alike
        for i in range(n_frames):
            img = images[colour_index(i / fps, hold_s, len(images))]
            if ticker:
                img = img.copy()
                img[:8, :8] = (i * 37) % 256
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return {"out": out, "question": question, "colours": colours, "frames": n_frames, "fps": fps,
            "hold_s": hold_s, "side": side}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="video file (.mp4, .mkv, .avi)")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--fps", type=int, default=5)
    p.add_argument("--hold", type=float, default=1.0, help="seconds each colour is shown")
    p.add_argument("--item", type=int, default=0, help="ShapesVQA test item drawn")
    p.add_argument("--side", type=int, default=REF_SIDE, help="frame side, pixels")
    p.add_argument("--codec", default="mpeg4")
    args = p.parse_args(argv)
    info = write_video(args.out, args.seconds, args.fps, args.hold, args.item, args.side, args.codec)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
