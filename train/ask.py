"""Ask a question about an image with the PyTorch model (reference generation).

Example: python train/ask.py --model runs/tiny/final --image data/shapes/images/test_000000.png \\
             --prompt "What colour is the circle?" --stream
"""
from __future__ import annotations

import argparse
import sys

from edgevlm.runtime.cli_run import add_generation_arguments, answer, format_timings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model dir, official MobileVLM dir, or preset")
    p.add_argument("--image", help="image file (omit for a text-only prompt)")
    p.add_argument("--prompt", required=True)
    add_generation_arguments(p)


def run(args: argparse.Namespace) -> int:
    from edgevlm import load_model

    result = answer(load_model(args.model), args, stream=args.stream)
    if not args.stream:
        print(result.text)
    print(format_timings(result.timings.to_dict()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    from edgevlm.cli import script_main

    script_main("ask")
