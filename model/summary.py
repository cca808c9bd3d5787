"""The model as a bundle manifest describes it: the model summary, the library versions, and the
manifest every target starts from (exporters add their files; the torch backend has none)."""
from __future__ import annotations

import importlib.metadata
from typing import Any

from edgevlm.runtime.manifest import FileEntry, Manifest, ModelSummary


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
