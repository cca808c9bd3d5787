"""Shared integrator helpers: construction from config and parameter counting."""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from edgevlm.runtime.errors import EdgeVLMError

if TYPE_CHECKING:
    from edgevlm.train.config import IntegratorConfig


def build_integrator(cfg: "IntegratorConfig", vision_dim: int, llm_dim: int, grid: int) -> nn.Module:
    """Instantiate the registered integrator ``cfg.name`` for a ``grid`` x ``grid`` patch layout."""
    from . import INTEGRATORS

    cls = INTEGRATORS.get(cfg.name)
    try:
        return cls(vision_dim, llm_dim, grid, **cfg.kwargs)
    except TypeError as e:
        raise EdgeVLMError(f"integrator {cfg.name!r}: bad kwargs {cfg.kwargs}: {e}") from None


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def check_grid(name: str, n_tokens: int, grid: int) -> None:
    if n_tokens != grid * grid:
        raise EdgeVLMError(
            f"integrator {name!r} needs a square patch grid without CLS ({grid}x{grid}={grid * grid} "
            f"tokens), got {n_tokens}; set vision.select_feature=patch"
        )
