"""LLaVA's projectors: ``linear`` and ``mlp2x_gelu``. Parameter names match LLaVA checkpoints
(``mm_projector.weight`` / ``mm_projector.{0,2}.weight``)."""
from __future__ import annotations

import torch
from torch import nn

from . import INTEGRATORS


@INTEGRATORS.register("linear")
class LinearProjector(nn.Linear):
    """Linear(d_v, d_t) per patch: keeps every token (no reduction)."""

    # llama.cpp has no plain-linear projector; ``gguf_mlp_layers`` rewrites it exactly as its `mlp`
    # type (twice the width, an identity-like second layer: ~6x the projector FLOPs in llama.cpp).
    gguf_projector = "mlp"

    def __init__(self, vision_dim: int, llm_dim: int, grid: int):
        super().__init__(vision_dim, llm_dim)

    def num_tokens(self, n_features: int) -> int:
        return n_features

    def gguf_mlp_layers(self) -> tuple[nn.Linear, nn.Linear]:
        """Linear -> GELU -> Linear computing exactly ``self``: with z = Wx + b, the first layer
        outputs [z; -z] and the second takes GELU(z) - GELU(-z) = z * (Phi(z) + Phi(-z)) = z.
        The identity holds for any GELU with an odd tanh/erf (llama.cpp's tanh form included)."""
        d_out, d_in = self.weight.shape
        kw = {"dtype": self.weight.dtype}
        up, down = nn.Linear(d_in, 2 * d_out, **kw), nn.Linear(2 * d_out, d_out, **kw)
        eye = torch.eye(d_out, dtype=self.weight.dtype)
        with torch.no_grad():
            up.weight.copy_(torch.cat([self.weight, -self.weight]))  # [2D, Dv]
            up.bias.copy_(torch.cat([self.bias, -self.bias]))
            down.weight.copy_(torch.cat([eye, -eye], dim=1))  # [D, 2D]
            down.bias.zero_()
        return up, down


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

    def gguf_mlp_layers(self) -> tuple[nn.Linear, nn.Linear]:
        return self[0], self[2]
