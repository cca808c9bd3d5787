"""Generate the built-in ShapesVQA dataset (LLaVA format, train/val/test + captions).

Example: python train/make_data.py --out data/shapes --n-train 4000
"""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="data/shapes", help="output folder (default: %(default)s)")
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-val", type=int, default=300)
    p.add_argument("--n-test", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from edgevlm.train.data.shapes import generate_shapes_vqa

    info = generate_shapes_vqa(args.out, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                               seed=args.seed)
    print(json.dumps(info, indent=2, default=str))
    return 0


if __name__ == "__main__":
    from edgevlm.cli import script_main

    script_main("data")
