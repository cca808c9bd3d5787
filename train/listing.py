"""List registry entries: integrators (visual tokens, parameters) or presets."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=["integrators", "presets"])
    p.add_argument("--preset", default="mobilevlm-1.7b",
                   help="preset whose vision/LLM widths size the integrators (default: %(default)s)")


def integrator_rows(preset: str) -> list[dict]:
    """Each integrator at ``preset``'s widths: placement (tokens / weights / in_block), visual
    tokens out and parameter count."""
    import torch

    from edgevlm.model.config import preset_config
    from edgevlm.model.integrators import INTEGRATORS, build_integrator, count_parameters
    from edgevlm.model.config import IntegratorConfig
    from edgevlm.model.integrators.base import placement

    cfg = preset_config(preset)
    rows = []
    with torch.device("meta"):  # shapes only: no memory, no init time
        for name in INTEGRATORS:
            m = build_integrator(IntegratorConfig(name), cfg.vision.hidden_size, cfg.llm.hidden_size,
                                 cfg.vision.grid, llm=cfg.llm)
            rows.append({"integrator": name, "placement": placement(m),
                         "visual_tokens": m.num_tokens(cfg.vision.num_features),
                         "params": count_parameters(m), "gguf": getattr(m, "gguf_projector", None) or "-"})
    return rows


def preset_rows() -> list[dict]:
    from edgevlm.model.config import PRESETS, preset_config

    rows = []
    for name in sorted(PRESETS):
        c = preset_config(name)
        rows.append({"preset": name, "integrator": c.integrator.name,
                     "vision": f"ViT {c.vision.num_hidden_layers}L/{c.vision.hidden_size}d @{c.vision.image_size}px/p{c.vision.patch_size}",
                     "llm": f"LLaMA {c.llm.num_hidden_layers}L/{c.llm.hidden_size}d vocab {c.llm.vocab_size}"})
    return rows


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    cols = list(rows[0])
    fmt = [max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, fmt)))
    for r in rows:
        print("  ".join(_fmt(r[c]).ljust(w) for c, w in zip(cols, fmt)))


def _fmt(v) -> str:
    if isinstance(v, int) and v >= 10_000:
        return f"{v / 1e6:.2f}M"
    return str(v)


def run(args: argparse.Namespace) -> int:
    if args.what == "integrators":
        print(f"integrators at preset {args.preset}:")
        print_table(integrator_rows(args.preset))
    else:
        print_table(preset_rows())
    return 0
