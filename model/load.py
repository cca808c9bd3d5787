"""``load_model``: an edgevlm checkpoint dir, an official MobileVLM dir, or a preset (random init)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from edgevlm.runtime.errors import EdgeVLMError
from edgevlm.runtime.tokenizer import TextTokenizer
from edgevlm.model.config import MODULES, PRESETS, VLMConfig, override_config, preset_config
from edgevlm.model import checkpoint, official
from edgevlm.model.vlm import EdgeVLM
from edgevlm.model.weights import load_state_strict, read_weights


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEVLM_CACHE", Path.home() / ".cache" / "edgevlm"))


def build_model(cfg: VLMConfig, tokenizer_dir: Path) -> EdgeVLM:
    """Instantiate ``cfg`` with deterministic random weights (seed ``cfg.seed``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = EdgeVLM(cfg, _tokenizer(tokenizer_dir, cfg))
    model.tokenizer_dir = Path(tokenizer_dir)
    return model.eval()


def load_model(name_or_path: str | os.PathLike, dtype: torch.dtype | None = None,
               fresh: Sequence[str] = (), **overrides: Any) -> EdgeVLM:
    """Load a model; keyword overrides change the config (``integrator="ldp"``, ``llm__num_hidden_layers=2``).

    Overrides that change weight shapes only make sense for presets, or for checkpoint modules
    named in ``fresh`` (``vision_tower``, ``integrator``, ``llm``): those start from the seeded
    random initialisation instead of the checkpoint, e.g. ``load_model(dir, fresh=["integrator"],
    integrator="resampler")`` puts a new integrator between a trained vision tower and LLM. Any
    other mismatch fails the strict weight check with the list of mismatched keys.
    """
    bad = [m for m in fresh if m not in MODULES]
    if bad:
        raise EdgeVLMError(f"fresh: unknown module(s) {bad}; valid: {', '.join(MODULES)}")
    path = Path(name_or_path)
    if path.is_dir():
        model = _load_dir(path, overrides, tuple(fresh))
    elif str(name_or_path) in PRESETS:
        cfg = preset_config(str(name_or_path), **overrides)
        model = build_model(cfg, preset_tokenizer_dir(cfg))
    else:
        raise EdgeVLMError(f"{name_or_path!r} is neither a model directory nor a preset; "
                           f"presets: {', '.join(sorted(PRESETS))}")
    return model.to(dtype) if dtype is not None else model


def _load_dir(path: Path, overrides: dict[str, Any], fresh: tuple[str, ...]) -> EdgeVLM:
    if checkpoint.is_edgevlm_dir(path):
        cfg = override_config(checkpoint.read_config(path), **overrides)
        model = build_model(cfg, path)
        checkpoint.load_weights_into(model, path, fresh)
        return model
    if official.is_official_dir(path):
        hf = json.loads((path / "config.json").read_text())
        raw = read_weights(path)
        cfg = override_config(official.official_config(path, hf, raw), **overrides)
        model = build_model(cfg, _official_tokenizer_dir(path))
        load_state_strict(model, official.official_state(path, hf, raw), str(path), fresh)
        return model
    raise EdgeVLMError(f"{path}: not an edgevlm or MobileVLM checkpoint (config.json lacks "
                       "'edgevlm_format' and 'mm_projector_type')")


def preset_tokenizer_dir(cfg: VLMConfig) -> Path:
    """The preset's tokenizer, built once per (vocab, seed) and cached; identical in every process."""
    from edgevlm.train.data.tokenizer import default_tokenizer

    out = cache_dir() / "tokenizers" / f"shapes-v{cfg.llm.vocab_size}-s{cfg.seed}"
    if not (out / "tokenizer.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tok.", dir=out.parent))
        default_tokenizer(str(tmp), cfg.llm.vocab_size, seed=cfg.seed)
        try:
            os.replace(tmp, out)  # another process may have won the race: its copy is identical
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _official_tokenizer_dir(path: Path) -> Path:
    """Official checkpoints ship tokenizer.model (slow); make sure a tokenizer.json exists beside it."""
    if (path / "tokenizer.json").is_file():
        return path
    out = cache_dir() / "converted-tokenizers" / _dir_key(path)
    if not (out / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(path), use_fast=True)
        except Exception as e:  # noqa: BLE001
            raise EdgeVLMError(f"{path}: cannot load its tokenizer ({e})") from None
        tok.save_pretrained(str(out))
    return out


def _dir_key(path: Path) -> str:
    import hashlib

    return hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]


def _tokenizer(tokenizer_dir: Path, cfg: VLMConfig) -> TextTokenizer:
    return TextTokenizer.from_dir(tokenizer_dir, bos_id=cfg.tokens.bos_id, eos_id=cfg.tokens.eos_id)
