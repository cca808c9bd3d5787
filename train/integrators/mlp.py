"""LLaVA's projectors: ``linear`` and ``mlp2x_gelu``. Parameter names match LLaVA checkpoints
(``mm_projector.weight`` / ``mm_projector.{0,2}.weight``)."""
from __future__ import annotations

import torch
from torch import nn

from . import INTEGRATORS


@INTEGRATORS.register("linear")
class LinearProjector(nn.Linear):
    """Linear(d_v, d_t) per patch: keeps every token (no reduction)."""

    gguf_projector = None  # written as an exact `mlp` projector in the GGUF exporter, if supported

    def __init__(self, vision_dim: int, llm_dim: int, grid: int):
        super().__init__(vision_dim, llm_dim)

    def num_tokens(self, n_features: int) -> int:
        return n_features


@INTEGRATORS.register("mlp2x_gelu")
class MLPProjector(nn.Sequential):
    """Linear -> GELU(erf) -> Linear per patch (LLaVA-1.5); llama.cpp projector type ``mlp``."""

    gguf_projector = "mlp"

    def __init__(self, vision_dim: int, llm_dim: int, grid: int):
        super().__init__(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))

    def num_tokens(self, n_features: int) -> int:
        return n_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, Dv] -> [B, N, D]
        return super().forward(x)
