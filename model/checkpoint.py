"""edgevlm's own checkpoint directory: config.json + model.safetensors + tokenizer files."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from edgevlm.runtime.errors import EdgeVLMError
from edgevlm.runtime.tokenizer import copy_tokenizer_files
from edgevlm.model.config import VLMConfig
from edgevlm.model.weights import load_state_strict, read_weights, write_weights

FORMAT_VERSION = 1


def is_edgevlm_dir(path: Path) -> bool:
    cfg = path / "config.json"
    return cfg.is_file() and "edgevlm_format" in _read_json(cfg)


def save_model(model, out_dir: str | os.PathLike) -> Path:
    """Write ``model`` (an EdgeVLM) atomically: a temp dir beside ``out_dir`` renamed at the end."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        meta = {"model_type": "edgevlm", "edgevlm_format": FORMAT_VERSION, **model.cfg.to_dict()}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        write_weights(model.state_dict(), tmp / "model.safetensors", {"format": "pt"})
        src = getattr(model, "tokenizer_dir", None)
        if src is None:
            raise EdgeVLMError("model has no tokenizer directory to save")
        copy_tokenizer_files(src, tmp)  # the runtime's TOKENIZER_FILES: every bundle copies the same
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_config(path: Path) -> VLMConfig:
    data = dict(_read_json(path / "config.json"))
    version = data.pop("edgevlm_format", None)
    data.pop("model_type", None)
    if version != FORMAT_VERSION:
        raise EdgeVLMError(f"{path}: edgevlm checkpoint format {version}, this edgevlm reads {FORMAT_VERSION}")
    return VLMConfig.from_dict(data)


def load_weights_into(model, path: Path, fresh: tuple[str, ...] = ()) -> None:
    load_state_strict(model, read_weights(path), str(path), fresh)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise EdgeVLMError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise EdgeVLMError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise EdgeVLMError(f"{path}: expected a JSON object")
    return data
