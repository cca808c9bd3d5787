"""Train a model from a recipe (stages of captions / instruction data), resumable.

Examples:
  python train/train.py --recipe train/configs/tiny.yaml
  python train/train.py --recipe train/configs/tiny.yaml output_dir=runs/x stages.1.lr=1e-4
  torchrun --nproc_per_node 2 train/train.py --recipe train/configs/tiny.yaml   # DDP
  torchrun --nproc_per_node 2 train/train.py --recipe train/configs/tiny.yaml stages.1.strategy=fsdp
  edgevlm train --plan train/configs/mobilevlm_finetune.yaml --gpus 8   # per-GPU memory, no training
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="YAML recipe (see train/configs/)")
    p.add_argument("--plan", metavar="RECIPE", help="print the per-GPU memory of RECIPE's stages under "
                   "ddp, fsdp, fsdp + cpu offload and LoRA (which fit), and exit")
    p.add_argument("--gpus", type=int, default=1, help="--plan: GPUs the state is sharded over (default 1)")
    p.add_argument("--gpu-mem", type=float, default=0, help="--plan: GB per GPU (default: 24, 40 and 80)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. stages.0.max_steps=10")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint of output_dir")
    p.add_argument("--stop-at-step", type=int, default=0, help=argparse.SUPPRESS)  # tests: simulate a kill


def run(args: argparse.Namespace) -> int:
    from edgevlm.runtime.configio import dump_yaml
    from edgevlm.runtime.errors import EdgeVLMError
    from edgevlm.train.loop import run as train
    from edgevlm.train.recipe import load_recipe

    if args.plan:
        from edgevlm.train.memory_plan import print_plan

        return print_plan(args)
    if not args.recipe:
        raise EdgeVLMError("give --recipe RECIPE (train) or --plan RECIPE (memory table)")
    cfg = load_recipe(args.recipe, args.overrides)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, out / "recipe.yaml")
    final = train(cfg, resume=args.resume, stop_at_step=args.stop_at_step)
    print(json.dumps({"model": str(final)}))
    return 0


if __name__ == "__main__":
    from edgevlm.cli import script_main

    script_main("train")
