"""Reading and writing weight files without pickles, and strict state-dict loading."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from edgevlm.runtime.errors import EdgeVLMError


def read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint dir: ``model.safetensors``, sharded safetensors (index json),
    or legacy ``pytorch_model*.bin`` read with ``torch.load(weights_only=True)`` (never unpickled)."""
    files = sorted(model_dir.glob("*.safetensors"))
    loader = _load_safetensors
    if not files:
        files = sorted(model_dir.glob("pytorch_model*.bin"))
        loader = _load_bin
    if not files:
        raise EdgeVLMError(f"{model_dir}: no weight files (*.safetensors or pytorch_model*.bin)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(loader(f))
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
