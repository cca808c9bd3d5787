"""Reading and writing weight files without pickles, and strict state-dict loading."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from edgevlm.runtime.errors import EdgeVLMError


# What Hugging Face reads as a checkpoint's weights, in its order of preference: one file, or the
# shards an index names. Any other file (a LoRA adapter_model.safetensors, a projector-only file)
# is not model weights.
WEIGHT_FILES = (("model.safetensors", "model.safetensors.index.json"),
                ("pytorch_model.bin", "pytorch_model.bin.index.json"))


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's weight files (see ``WEIGHT_FILES``)."""
    for single, index in WEIGHT_FILES:
        if (model_dir / single).is_file():
            return [model_dir / single]
        if (model_dir / index).is_file():
            return _shards(model_dir / index)
    names = [n for pair in WEIGHT_FILES for n in pair]
    others = sorted(p.name for p in model_dir.glob("*.safetensors")) + sorted(p.name for p in model_dir.glob("*.bin"))
    found = f" ({', '.join(others)} {'is' if len(others) == 1 else 'are'} not model weights)" if others else ""
    raise EdgeVLMError(f"{model_dir}: no weight files: expected {', '.join(names[:-1])} or {names[-1]}{found}")


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EdgeVLMError(f"{index}: not a shard index with a weight_map ({type(e).__name__}: {e})") from None
    files = sorted({index.parent / name for name in weight_map.values()})
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise EdgeVLMError(f"{index}: names shard(s) that are missing: {', '.join(missing)}")
    return files


def read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint dir (``weight_files``); ``.bin`` files are read with
    ``torch.load(weights_only=True)`` (never unpickled)."""
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(model_dir):
        state.update(_load_safetensors(f) if f.suffix == ".safetensors" else _load_bin(f))
    return state


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise EdgeVLMError(f"{path}: not a readable safetensors file ({e})") from None


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here is a bad file, reported as such
        raise EdgeVLMError(f"{path}: not a readable weights-only torch file ({type(e).__name__}: {e})") from None


def write_weights(state: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """Save tensors as safetensors (tied/shared tensors are cloned so the file stands alone)."""
    seen: dict[int, str] = {}
    out = {}
    for k, v in state.items():
        v = v.detach().cpu()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone().contiguous() if ptr in seen else v.contiguous()
        seen[ptr] = k
    save_file(out, str(path), metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str,
                      fresh: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``model``; any missing, unexpected or mis-shaped key is an error that
    lists them (up to 10 of each). Keys under a ``fresh`` module prefix (e.g. ``integrator``)
    are neither loaded nor checked: those modules keep their fresh initialisation."""
    skip = tuple(f"{m}." for m in fresh)
    state = {k: v for k, v in state.items() if not k.startswith(skip)}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}
    tied = _tied_keys(model)
    missing = [k for k in own if k not in state and k not in tied]
    unexpected = [k for k in state if k not in own]
    shape = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
             if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shape)):
            if keys:
                more = f" (+{len(keys) - 10} more)" if len(keys) > 10 else ""
                parts.append(f"{label}: {', '.join(keys[:10])}{more}")
        raise EdgeVLMError(f"{source}: weights do not match the config; " + "; ".join(parts))
    model.load_state_dict(state, strict=False)


def _tied_keys(model: nn.Module) -> set[str]:
    llm = getattr(model, "llm", None)
    if llm is not None and llm.config.tie_word_embeddings:
        return {"llm.lm_head.weight"}
    return set()
