"""What every exporter shares: model loading, the manifest's model summary, tokenizer files,
library versions. (Named ``common`` so nothing here shadows a real library when a script in
export/ runs by path.)"""
from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path
from typing import Any, Sequence

from edgevlm.runtime.errors import EdgeVLMError

from edgevlm.runtime.manifest import BundleWriter, FileEntry, Manifest, ModelSummary

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def load_for_export(model: str, cli_overrides: Sequence[str] = (), **overrides: Any):
    """A model dir or preset, in fp32 eval mode, LoRA already merged (checkpoints store merged weights).

    ``cli_overrides``: ``key=value`` strings from the command line (``llm.num_hidden_layers=2``).
    """
    from edgevlm import load_model
    from edgevlm.runtime.configio import parse_key_values

    overrides.update(parse_key_values(cli_overrides))
    return load_model(model, **overrides).float().eval()


def require_exportable(model, target: str) -> None:
    """EdgeVLMError with the integrator's reason if ``model`` cannot be exported to ``target``."""
    from edgevlm.train.integrators import export_refusal

    name = model.cfg.integrator.name
    reason = export_refusal(name, target)
    if reason:
        raise EdgeVLMError(f"integrator {name!r} cannot be exported to {target}: {reason}")


def model_source(model: str) -> str | None:
    """The absolute model dir recorded in a manifest (None for presets)."""
    return str(Path(model).resolve()) if Path(model).is_dir() else None


def model_summary(model) -> ModelSummary:
    c = model.cfg
    return ModelSummary(
        preset=c.preset, integrator=c.integrator.name, n_visual_tokens=model.n_visual_tokens,
        vision_hidden=c.vision.hidden_size, image_size=c.vision.image_size, patch_size=c.vision.patch_size,
        hidden_size=c.llm.hidden_size, num_layers=c.llm.num_hidden_layers, num_heads=c.llm.num_attention_heads,
        num_kv_heads=c.llm.num_key_value_heads, head_dim=c.llm.hidden_size // c.llm.num_attention_heads,
        vocab_size=c.llm.vocab_size, max_positions=c.llm.max_position_embeddings,
        params=model.parameter_counts(),
    )


def library_versions(*names: str) -> dict[str, str]:
    out = {}
    for n in ("edgevlm", "torch", "transformers", *names):
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            out[n] = "not installed"
    return out


def copy_tokenizer(model, writer: BundleWriter) -> list[FileEntry]:
    """The tokenizer travels with the bundle (``tokenizer.json`` is what the runtime reads)."""
    entries = []
    for name in TOKENIZER_FILES:
        src = Path(model.tokenizer_dir) / name
        if src.is_file():
            shutil.copy2(src, writer.path(name))
            entries.append(FileEntry(name, "tokenizer" if name == "tokenizer.json" else "tokenizer_extra"))
    return entries


def base_manifest(model, target: str, files: list[FileEntry], exporter: str, libraries: tuple[str, ...] = (),
                  target_info: dict[str, Any] | None = None) -> Manifest:
    c = model.cfg
    return Manifest(
        target=target, model=model_summary(model), preprocess=c.preprocess, chat_template=c.chat_template,
        tokens={"bos_id": c.tokens.bos_id, "eos_id": c.tokens.eos_id, "pad_id": c.tokens.pad_id,
                "unk_id": c.tokens.unk_id, "image_token": c.tokens.image_token},
        files=files, exporter={"name": exporter, "versions": library_versions(*libraries)},
        target_info=dict(target_info or {}),
    )
