"""The model as a bundle manifest describes it: the model summary, the library versions, and the
manifest every target starts from (exporters add their files; the torch backend has none)."""
from __future__ import annotations

import copy
import importlib.metadata

from edgevlm.runtime.chat import get_template
from edgevlm.runtime.manifest import ExporterInfo, FileEntry, Manifest, ModelSummary
from edgevlm.runtime.target_info import TargetInfo, TorchInfo


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
                  target_info: TargetInfo | None = None) -> Manifest:
    """The manifest of ``model`` for ``target``: ``target_info`` is that target's dataclass
    (``runtime.target_info``); the torch backend's in-memory manifest gets ``TorchInfo``."""
    c = model.cfg
    return Manifest(
        target=target, model=model_summary(model), preprocess=c.preprocess,
        chat_template=get_template(c.chat_template), tokens=copy.deepcopy(c.tokens),
        target_info=target_info if target_info is not None else TorchInfo(),
        files=files, exporter=ExporterInfo(exporter, library_versions(*libraries)),
    )
