"""Modality integrators: the registry and one file per family.

Every integrator is an ``nn.Module`` built as ``cls(vision_dim, llm_dim, grid, **kwargs)`` with
``forward(features[B, N, Dv]) -> [B, M, Dllm]`` and ``num_tokens(n_features) -> M``.
Class attributes say where it can go: ``gguf_projector`` (llama.cpp mmproj type or None) and
``export_refusals`` ({target: reason} for export targets it cannot reach; see ``export_refusal``).
"""
from __future__ import annotations

from edgevlm.runtime.registry import Registry

INTEGRATORS: Registry = Registry("integrator")

from . import mlp, ldp  # noqa: E402,F401  (register entries)
from . import abstractor, resampler, qformer, pixel_shuffle  # noqa: E402,F401  (out-of-block)
from . import vlora, adapter, prefix  # noqa: E402,F401  (integrators inside the LLM, see hooks.py)
from .base import EXPORT_TARGETS, build_integrator, count_parameters, export_refusal  # noqa: E402,F401
