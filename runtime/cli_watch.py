"""Ask a standing question about a video file, stream URL or camera; one JSON line per frame answered.

Examples:
    edgevlm watch --bundle bundles/tiny-onnx-int4 --source clip.mp4 --prompt "What colour is the circle?" --every 1
    edgevlm watch --bundle B --source /dev/video0 --prompt "Is anyone at the door?" --fps 1 --min-change 4
    edgevlm watch --bundle B --source rtsp://cam.local/stream --prompt "What changed?" --frames 2

A file is sampled exactly in source time (--every/--fps; default every frame), so a run is
reproducible; --realtime plays it like a camera instead. A URL or camera is read live: a thread decodes
into a one-slot buffer, the newest frame always wins, and each line counts the frames "dropped" since
the last one. Each line: frame index and source time ("time_s"), "wall_time", "answer", "asked" (false:
unchanged frame, last answer repeated), "change", "dropped", "frames" in the prompt, "timings" (ms), "cache".
Needs the [video] extra (PyAV).
"""
from __future__ import annotations

import argparse
import sys

from .cli_run import add_runtime_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="bundle dir (manifest.json), or a model dir or preset (torch)")
    p.add_argument("--source", required=True, help="video file, rtsp:// or http(s):// stream URL, or /dev/videoN")
    p.add_argument("--prompt", required=True)
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--every", type=float, default=None,
                      help="seconds between frames asked about (file: source time; live: wall time)")
    rate.add_argument("--fps", type=float, default=None, help="frames asked about per second (1 / --every)")
    p.add_argument("--frames", type=int, default=1, help="ask about the last K frames in one prompt")
    p.add_argument("--min-change", type=float, default=0.0,
                   help="re-ask only when the frame differs this much (mean |diff| 0-255 of a 32x32 RGB "
                        "thumbnail) from the last one asked about; 0: ask every frame")
    p.add_argument("--realtime", action="store_true", help="play a file at its own rate, newest frame wins")
    p.add_argument("--count", type=int, default=None, help="stop after this many lines")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a stream to open or answer")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--image-cache-mb", type=float, default=64.0, help="image-embedding cache size (0: off)")
    p.add_argument("--no-prefix-reuse", action="store_true", help="always prefill the whole prompt")
    add_runtime_arguments(p)


def run(args: argparse.Namespace) -> int:
    from .cli_run import runtime_options
    from .engine import Runtime
    from .video import open_container

    open_container(args.source, args.timeout).close()  # a bad source fails before the model loads
    with Runtime.load(args.bundle, backend=args.backend, image_cache_mb=args.image_cache_mb,
                      prefix_reuse=not args.no_prefix_reuse, **runtime_options(args)) as rt:
        results = rt.watch(args.source, args.prompt, every_s=args.every, fps=args.fps, frames=args.frames,
                           min_change=args.min_change, realtime=args.realtime or None, max_answers=args.count,
                           max_new_tokens=args.max_new_tokens, timeout_s=args.timeout)
        try:
            for r in results:
                print(r.to_json(), flush=True)
        except BrokenPipeError:  # `edgevlm watch ... | head`
            sys.stderr.close()
        finally:
            results.close()
    return 0


if __name__ == "__main__":
    from edgevlm.cli import script_main

    script_main("watch")
