"""Pixel-shuffle MLP (``pixel_shuffle_mlp``): space-to-depth by ``scale`` s, then InternVL's
``mlp1`` (LayerNorm, Linear, GELU, Linear). nanoVLM and Idefics3 shuffle the same way and follow
it with one Linear; InternVL's LayerNorm + two-layer MLP is used here because it is the form a
llama.cpp projector (``internvl``) runs.

    [B, g*g, Dv] -> [B, g/s, g/s, s*s*Dv] -> [B, (g/s)^2, D]

Output token (Y, X) holds the s x s block of patches (Y*s + dy, X*s + dx), concatenated in
(dy, dx) order: channels ``(dy*s + dx)*Dv + c``. That is the layout llama.cpp's InternVL graph
produces (its reshape/permute sequence), so its ``mm.*`` tensors apply unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from edgevlm.runtime.errors import EdgeVLMError

from . import INTEGRATORS
from .base import check_grid


def space_to_depth(x: torch.Tensor, grid: int, s: int, c: int) -> torch.Tensor:
    """[B, g*g, C] -> [B, (g/s)^2, s*s*C], channels in (dy, dx, c) order. At most 5-D (Core ML);
    sizes are Python ints (a traced ``x.shape[-1]`` would become an op Core ML cannot convert)."""
    k = grid // s
    x = x.reshape(-1, k, s, k, s * c)  # [B, Y, dy, X, (dx, c)]: x = X*s + dx is contiguous
    x = x.permute(0, 1, 3, 2, 4)  # [B, Y, X, dy, (dx, c)]
    return x.reshape(-1, k * k, s * s * c)  # [B, (g/s)^2, s*s*C]


@INTEGRATORS.register("pixel_shuffle_mlp")
class PixelShuffleMLP(nn.Module):
    """kwargs: ``scale`` (default 2; must divide the patch grid). Tokens: (g / s)^2."""

    gguf_projector = "internvl"

    def __init__(self, vision_dim: int, llm_dim: int, grid: int, *, scale: int = 2):
        super().__init__()
        if not isinstance(scale, int) or scale < 1:
            raise EdgeVLMError(f"pixel_shuffle_mlp scale must be a positive integer, got {scale!r}")
        if grid % scale:
            raise EdgeVLMError(f"pixel_shuffle_mlp scale {scale} does not divide the {grid}x{grid} patch "
                               f"grid; pick a scale that divides {grid} (e.g. 2 or 3 for 24)")
        self.grid, self.scale, self.vision_dim = grid, scale, vision_dim
        width = scale * scale * vision_dim
        # indices 0, 1, 3 as InternVL's mlp1 (LayerNorm, Linear, GELU, Linear)
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, llm_dim), nn.GELU(),
                                 nn.Linear(llm_dim, llm_dim))

    def num_tokens(self, n_features: int) -> int:
        return (self.grid // self.scale) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, g*g, Dv] -> [B, (g/s)^2, D]
        check_grid("pixel_shuffle_mlp", x.shape[1], self.grid)
        return self.mlp(space_to_depth(x, self.grid, self.scale, self.vision_dim))
