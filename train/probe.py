"""Probe what a model's visual features encode about ShapesVQA shapes (a training diagnostic).

Example: python train/probe.py --model runs/tiny/final
         python train/probe.py --model tiny --supervised-steps 300
         python train/probe.py --model tiny --supervised-steps 300 --set vision__num_hidden_layers=7
         python train/probe.py --model tiny --images 3600 --readout-epochs 12

For each shape in ShapesVQA train scenes (regenerated from the seed; nothing is read from disk),
take the vision tower's feature at the patch under the shape's centre and the integrator's token at
the cell under it, and fit a linear classifier (multinomial logistic regression) for the shape's
kind and colour on 75% of the shapes; report held-out accuracy beside the majority baseline. A
feature that answers "kind" well above the baseline at the centre token knows which shape it sits
in; one near the baseline only knows its colour.

``--supervised-steps N`` first trains the vision tower alone for N steps (batch 8, AdamW) with a
per-patch linear head on per-patch labels (which colour and kind of shape covers the patch centre,
or background), then reports per-patch accuracy on held-out images before probing: how fast the
tower can learn shapes at all when told directly, without the LLM in the way.

``--readout-epochs N`` also trains a small attention readout on the integrator's tokens to answer
"what shape is the <colour> object?" (``probe_readout.py``): what the tokens carry for the question
the LLM must learn, when a dedicated model reads them over every token rather than one.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np

from edgevlm.runtime.errors import EdgeVLMError

TRAIN_FRACTION = 0.75


def train_scenes(seed: int, start: int, n: int):
    """ShapesVQA train scenes start .. start + n - 1 of ``seed``, regenerated (nothing read from disk)."""
    from edgevlm.train.data.shapes import make_item

    return [make_item(seed, "train", i)[0] for i in range(start, start + n)]


def patch_labels(scene, grid: int):
    """[grid * grid] int64: 0 background, else 1 + colour * n_kinds + kind of the shape covering
    each patch centre (drawn with the dataset's own shape renderer)."""
    from PIL import Image, ImageDraw

    from edgevlm.train.data.shapes import draw_shape
    from edgevlm.train.data.shapes_questions import COLOURS, KINDS

    lab = Image.new("L", (scene.side, scene.side), 0)
    draw = ImageDraw.Draw(lab)
    for s in scene.shapes:
        draw_shape(draw, replace(s, rgb=1 + COLOURS.index(s.colour) * len(KINDS) + KINDS.index(s.kind)))
    step = scene.side / grid
    centres = (np.arange(grid) * step + step / 2).astype(int)
    return np.asarray(lab)[np.ix_(centres, centres)].reshape(-1).astype(np.int64)


def scene_pixels(model, scenes):
    """The model's pixel_values for rendered ``scenes``."""
    import torch

    from edgevlm.train.data.shapes import render_scene

    return torch.cat([model.preprocess(render_scene(s)) for s in scenes])  # [B, 3, S, S]


def supervised_warmup(model, steps: int, lr: float, seed: int) -> dict:
    """Train the used vision blocks with a per-patch linear head; held-out per-patch accuracy."""
    import torch

    from edgevlm.train.data.shapes_questions import COLOURS, KINDS

    tower, grid = model.vision_tower, model.cfg.vision.grid
    if model.cfg.vision.select_feature != "patch":
        raise EdgeVLMError("--supervised-steps needs select_feature 'patch' (one feature per patch)")
    head = torch.nn.Linear(model.cfg.vision.hidden_size, 1 + len(COLOURS) * len(KINDS))
    opt = torch.optim.AdamW([*tower.used_parameters(), *head.parameters()], lr=lr, weight_decay=0.0)
    tower.train()
    for step in range(steps):
        scenes = train_scenes(seed, 8 * step, 8)
        y = torch.from_numpy(np.stack([patch_labels(s, grid) for s in scenes]))  # [8, N]
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 10)  # 10 warm-up steps
        logits = head(tower(scene_pixels(model, scenes)))  # [8, N, classes]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    tower.eval()
    held = train_scenes(seed, 8 * steps + 10_000, 48)
    y = np.stack([patch_labels(s, grid) for s in held]).reshape(-1)
    with torch.no_grad():
        pred = head(tower(scene_pixels(model, held))).argmax(-1).reshape(-1).numpy()
    fg, k = y > 0, len(KINDS)
    return {"steps": steps, "lr": lr,
            "patch_kind_accuracy": float(((pred[fg] - 1) % k == (y[fg] - 1) % k).mean()),
            "patch_colour_accuracy": float(((pred[fg] - 1) // k == (y[fg] - 1) // k).mean()),
            "background_accuracy": float((pred[~fg] == 0).mean())}


def centre_features(model, scenes, keep_tokens: bool = False) -> dict[str, np.ndarray]:
    """{"vision": [n_shapes, Dv], "integrator": [n_shapes, D] (None if its tokens are not a
    square grid), "kind": [n_shapes], "colour": [n_shapes]}; with ``keep_tokens`` also "tokens":
    every integrator token of every scene, [n_scenes, M, D] float16 (for the readout probe)."""
    import torch

    from edgevlm.train.data.shapes_questions import COLOURS, KINDS

    out: dict[str, list] = {"vision": [], "integrator": [], "kind": [], "colour": [], "tokens": []}
    with torch.no_grad():
        for i in range(0, len(scenes), 16):
            chunk = scenes[i:i + 16]
            pv = scene_pixels(model, chunk)
            feats = {"vision": model.vision_tower(pv)[:, -model.cfg.vision.num_patches:],  # [B, N, Dv]
                     "integrator": model.encode_images(pv)}  # [B, M, D]
            if keep_tokens:
                out["tokens"].append(feats["integrator"].half().numpy())
            grids = {name: round(f.shape[1] ** 0.5) for name, f in feats.items()}
            grids = {name: g for name, g in grids.items() if g > 0 and g * g == feats[name].shape[1]}
            for b, scene in enumerate(chunk):
                for s in scene.shapes:
                    for name, g in grids.items():
                        row, col = int(s.cy * g / scene.side), int(s.cx * g / scene.side)
                        out[name].append(feats[name][b, row * g + col].float().numpy())
                    out["kind"].append(KINDS.index(s.kind))
                    out["colour"].append(COLOURS.index(s.colour))
    tokens = out.pop("tokens")
    result = {k: np.stack(v) if v else None for k, v in out.items()}
    if keep_tokens:
        result["tokens"] = np.concatenate(tokens)
    return result


def held_out_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): a seeded shuffle, TRAIN_FRACTION of it for training."""
    order = np.random.default_rng(seed).permutation(n)
    k = int(n * TRAIN_FRACTION)
    return order[:k], order[k:]


def linear_probe(x: np.ndarray, y: np.ndarray, seed: int, steps: int = 400) -> float:
    """Held-out accuracy of an L2-regularised softmax classifier on standardised features."""
    import torch

    train, test = held_out_split(len(y), seed)
    x = (x - x.mean(0)) / (x.std(0) + 1e-5)
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y)
    torch.manual_seed(seed)
    lin = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(lin.parameters(), lr=0.01)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(lin(xt[train]), yt[train]) + 1e-3 * lin.weight.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((lin(xt[test]).argmax(1) == yt[test]).float().mean())


def probe(feats: dict[str, np.ndarray], seed: int) -> dict:
    """Linear probes of kind and colour on ``centre_features`` output, beside the majority."""
    result: dict = {"n_shapes": int(len(feats["kind"]))}
    for target in ("kind", "colour"):
        y = feats[target]
        _, test = held_out_split(len(y), seed)  # the shapes every probe below is scored on
        result[f"{target}_majority"] = float(np.bincount(y[test]).max() / len(test))
        for where in ("vision", "integrator"):
            if feats[where] is not None:
                result[f"{target}_{where}"] = linear_probe(feats[where], y, seed)
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model dir, official MobileVLM dir, or preset")
    p.add_argument("--images", type=int, default=800, help="ShapesVQA train scenes to probe (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="ShapesVQA seed and probe split seed")
    p.add_argument("--supervised-steps", type=int, default=0,
                   help="first train the vision tower alone on per-patch labels for this many steps")
    p.add_argument("--readout-epochs", type=int, default=0,
                   help="also train an attention readout of 'what shape is the <colour> object?' on the "
                        "integrator tokens for this many epochs (see probe_readout.py; use --images 3600)")
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate for --supervised-steps")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override when --model is a preset, e.g. vision__num_hidden_layers=7 (repeatable)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", help="also write the result here")


def run(args: argparse.Namespace) -> int:
    import torch

    from edgevlm import load_model
    from edgevlm.runtime.configio import parse_key_values
    from edgevlm.train.probe_readout import readout

    if args.images < 8:
        raise EdgeVLMError("--images must be at least 8")
    if args.readout_epochs < 0 or args.supervised_steps < 0:
        raise EdgeVLMError("--readout-epochs and --supervised-steps must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    overrides = parse_key_values(args.set, what="--set")
    model = load_model(args.model, **overrides).eval()
    result: dict = {"model": args.model, "overrides": overrides,
                    "vision_layers_used": model.vision_tower.layers_used}
    if args.supervised_steps > 0:
        result["supervised"] = supervised_warmup(model, args.supervised_steps, args.lr, args.seed)
    scenes = train_scenes(args.seed, 0, args.images)
    feats = centre_features(model, scenes, keep_tokens=args.readout_epochs > 0)  # one encoding pass
    result["probe"] = probe(feats, args.seed)
    if args.readout_epochs:
        result["readout"] = readout(feats["tokens"], scenes, args.readout_epochs, args.seed)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    from edgevlm.cli import script_main

    script_main("probe")
