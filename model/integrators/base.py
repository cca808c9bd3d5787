"""Shared integrator helpers: construction from config, placement, export refusals, parameter counting."""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from edgevlm.runtime.errors import EdgeVLMError
from edgevlm.runtime.target_info import BUNDLE_TARGETS

if TYPE_CHECKING:
    from edgevlm.model.config import IntegratorConfig, LLMConfig

# Where an integrator puts the image (class attribute ``placement``; absent means "tokens"):
#   tokens    visual tokens spliced into the LLM's input sequence (forward -> [B, M, D], M > 0)
#   weights   per-image low-rank deltas on LLM weights (vlora); forward -> [B, 0, D]
#   in_block  modules inside the decoder blocks (bottleneck_adapter, gated_prefix)
# Non-token integrators are LLMHookIntegrators (hooks.py): built with the LLM's config, attached to
# the LLM with forward hooks by EdgeVLM, their parameters under ``integrator.*``.
PLACEMENTS = ("tokens", "weights", "in_block")


def placement(integrator) -> str:
    """The placement of an integrator class or instance (see PLACEMENTS)."""
    return getattr(integrator, "placement", "tokens")


def build_integrator(cfg: "IntegratorConfig", vision_dim: int, llm_dim: int, grid: int,
                     llm: "LLMConfig | None" = None) -> nn.Module:
    """Instantiate the registered integrator ``cfg.name`` for a ``grid`` x ``grid`` patch layout.

    ``llm``: the LLM's config, which integrators acting inside the LLM need (layers, heads); without
    it they are sized for a MobileLLaMA-like LLM of width ``llm_dim`` (shape-only uses)."""
    from . import INTEGRATORS

    cls = INTEGRATORS.get(cfg.name)
    extra = {}
    if placement(cls) != "tokens":
        from .hooks import default_llm_config

        extra["llm"] = llm if llm is not None else default_llm_config(llm_dim)
    try:
        return cls(vision_dim, llm_dim, grid, **cfg.kwargs, **extra)
    except TypeError as e:
        raise EdgeVLMError(f"integrator {cfg.name!r}: bad kwargs {cfg.kwargs}: {e}") from None


EXPORT_TARGETS = BUNDLE_TARGETS  # onnx, trt, gguf, coreml: the manifest's and the CLI's names


def export_refusal(name: str, target: str) -> str | None:
    """Why integrator ``name`` cannot go to ``target`` (one of EXPORT_TARGETS), or None if it can.

    Integrators declare refusals as a class attribute ``export_refusals = {target: reason}``;
    GGUF additionally needs a ``gguf_projector`` (a llama.cpp projector type)."""
    from . import INTEGRATORS

    if target not in EXPORT_TARGETS:
        raise ValueError(f"unknown export target {target!r}; valid: {', '.join(EXPORT_TARGETS)}")
    cls = INTEGRATORS.get(name)
    reason = getattr(cls, "export_refusals", {}).get(target)
    if reason is None and target == "gguf" and not getattr(cls, "gguf_projector", None):
        reason = "llama.cpp has no projector type for it"
    return reason


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def check_grid(name: str, n_tokens: int, grid: int) -> None:
    if n_tokens != grid * grid:
        raise EdgeVLMError(
            f"integrator {name!r} needs a square patch grid without CLS ({grid}x{grid}={grid * grid} "
            f"tokens), got {n_tokens}; set vision.select_feature=patch"
        )
