"""Resumable trainer state without pickles: trainable weights, optimizer moments, step and RNG,
as safetensors + JSON in ``checkpoints/step-NNNNNN``; written atomically, the last two kept."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from edgevlm.runtime.errors import EdgeVLMError


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(ckpt_root: Path, step: int, model, optimizer, keep: int = 2) -> Path:
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=ckpt_root))
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    opt = optimizer.state_dict()
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, st in opt["state"].items()
               for k, v in st.items() if torch.is_tensor(v)}
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "param_groups": opt["param_groups"]}))
    final = ckpt_root / f"step-{step:06d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(ckpt_root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    done = sorted(p for p in ckpt_root.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(path: Path, model, optimizer) -> int:
    """Restore into an already-built model (same trainable set) and optimizer; returns the step."""
    if json.loads((path / "state.json").read_text()).get("format") == "dcp":
        raise EdgeVLMError(f"{path} is a sharded (fsdp) checkpoint; resume it with stages.N.strategy=fsdp")
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    for name, value in weights.items():
        params[name].data.copy_(value)
    tensors = load_file(str(path / "optimizer.safetensors"))
    meta = json.loads((path / "state.json").read_text())
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("rng."):
            continue
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return int(meta["step"])
