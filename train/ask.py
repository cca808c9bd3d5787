"""Ask a question about an image with the PyTorch model (reference generation).

Example: python train/ask.py --model runs/tiny/final --image data/shapes/images/test_000000.png \\
             --prompt "What colour is the circle?" --stream
"""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model dir, official MobileVLM dir, or preset")
    p.add_argument("--image", help="image file (omit for a text-only prompt)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stream", action="store_true", help="print text as it is generated")


def run(args: argparse.Namespace) -> int:
    from edgevlm import load_model

    model = load_model(args.model)
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
               top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.stream:
        s = model.stream(image=args.image, prompt=args.prompt, **gen)
        for piece in s:
            sys.stdout.write(piece)
            sys.stdout.flush()
        print()
        result = s.result
    else:
        result = model.generate(image=args.image, prompt=args.prompt, **gen)
        print(result.text)
    print(json.dumps(result.timings.to_dict()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    from edgevlm.cli import script_main

    script_main("ask")
