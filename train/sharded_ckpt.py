"""Sharded trainer state for FSDP through ``torch.distributed.checkpoint`` (DCP): every rank writes
its own shards of the trainable weights and their AdamW moments (frozen weights are not saved: they
come back from the stage's start model), plus its RNG state; rank 0 adds ``state.json`` (step, world
size). Same layout and rules as ``train/state.py``: ``checkpoints/step-NNNNNN``, written under a
temporary name and renamed when every rank is done, the last two kept, ``latest_checkpoint`` finds
them. The output directory must be shared by every node (one file system)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from edgevlm.runtime.errors import EdgeVLMError

FORMAT = "dcp"
# trainable weights only; loading them leaves the frozen ones as built (strict=False for that reason)
_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


def save_sharded(ckpt_root: Path, step: int, model, optimizer, info, keep: int = 2) -> Path:
    """Collective: every rank calls it. Returns ``ckpt_root/step-NNNNNN``."""
    final = ckpt_root / f"step-{step:06d}"
    tmp = ckpt_root / f".tmp-step-{step:06d}"  # one name every rank agrees on
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    save_file(_rng_state(), str(tmp / f"rng-rank{info.rank}.safetensors"))
    dist.barrier()
    if info.is_main:
        (tmp / "state.json").write_text(json.dumps({"step": step, "format": FORMAT, "world_size": info.world}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(ckpt_root.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_sharded(path: Path, model, optimizer, info) -> int:
    """Collective: restore the sharded model and optimizer (already built and sharded the same way)
    and this rank's RNG; returns the step."""
    meta = json.loads((path / "state.json").read_text())
    if meta.get("format") != FORMAT:
        raise EdgeVLMError(f"{path} was written by a ddp run; resume it with stages.N.strategy=ddp "
                           "(or start the fsdp stage afresh in a new output_dir)")
    if meta["world_size"] != info.world:
        raise EdgeVLMError(f"{path} was written by {meta['world_size']} ranks, this run has {info.world}; "
                           "resume with the same number (each rank's data order depends on it)")
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_OPTIONS)
    rng = load_file(str(path / f"rng-rank{info.rank}.safetensors"))
    torch.set_rng_state(rng["rng.torch"])
    if "rng.cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["rng.cuda"])
    return int(meta["step"])


def checkpoint_format(path: Path) -> str:
    """``dcp`` for a sharded checkpoint, ``safetensors`` for ``train/state.py``'s."""
    return json.loads((path / "state.json").read_text()).get("format", "safetensors")


def saved_optimizer_keys(path: Path) -> list[str]:
    """The fully qualified names of the optimizer state entries a sharded checkpoint holds."""
    reader = dcp.FileSystemReader(str(path))
    return sorted(k for k in reader.read_metadata().state_dict_metadata if k.startswith("optim.state."))


def _rng_state() -> dict[str, torch.Tensor]:
    rng = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["rng.cuda"] = torch.cuda.get_rng_state()
    return rng
