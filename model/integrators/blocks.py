"""Pieces the attention-based integrators share: 2-D sin-cos position tables, multi-head
attention with separate q/k/v/out projections, argument checks.

Attention is written with ``nn.Linear`` projections and ``F.scaled_dot_product_attention``
instead of ``nn.MultiheadAttention``: the same parameters (MHA's ``in_proj`` split in three),
but no fused fast path, so the ONNX, TensorRT and Core ML exporters see plain MatMul/Softmax and
the GGUF writer can name q, k and v separately.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgevlm.runtime.errors import EdgeVLMError


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[P] positions -> [P, dim]: sin(pos * w_i) for i < dim/2, then cos; w_i = 10000^(-2i/dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # [dim/2]
    out = pos.to(torch.float64)[:, None] * omega[None]  # [P, dim/2]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """MAE / Qwen-VL / MiniCPM-V table for a ``grid`` x ``grid`` row-major layout: [grid^2, dim].

    The first half encodes the column (x), the second the row (y) -- the order of MAE's
    ``get_2d_sincos_pos_embed`` (its meshgrid puts w first) and of llama.cpp's resampler graph."""
    if dim % 4:
        raise EdgeVLMError(f"2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    idx = torch.arange(grid * grid)
    x, y = idx % grid, idx // grid  # [grid^2] each
    return torch.cat([sincos_1d(dim // 2, x), sincos_1d(dim // 2, y)], dim=1).float()  # [grid^2, dim]


def square_side(n: int, what: str) -> int:
    """sqrt(n) for a perfect square n > 0, else EdgeVLMError naming ``what``."""
    side = math.isqrt(n) if isinstance(n, int) and n > 0 else 0
    if side * side != n or side == 0:
        raise EdgeVLMError(f"{what} must be a positive perfect square (e.g. 64, 144, 256), got {n!r}")
    return side


def default_heads(dim: int, head_dim: int = 128) -> int:
    """Qwen-VL / MiniCPM-V use ``dim // 128`` heads; widths that are not a multiple of 128 get 1."""
    return dim // head_dim if dim % head_dim == 0 else 1


def check_heads(name: str, dim: int, heads: int) -> int:
    if not isinstance(heads, int) or heads < 1 or dim % heads:
        raise EdgeVLMError(f"integrator {name!r}: num_heads={heads!r} must be a positive divisor of "
                           f"the attention width {dim}")
    return heads


class Attention(nn.Module):
    """Multi-head attention: q from ``dim``, k and v from ``kv_dim``, out to ``dim`` (all biased)."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim or dim, dim)
        self.v = nn.Linear(kv_dim or dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, H, L, Dh]
        return t.reshape(*t.shape[:-1], self.heads, self.head_dim).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q [B, M, D], k/v [B, N, Dkv] -> [B, M, D]
        o = F.scaled_dot_product_attention(self._split(self.q(q)), self._split(self.k(k)),
                                           self._split(self.v(v)))  # [B, H, M, Dh]
        return self.out(o.transpose(1, 2).reshape(*q.shape[:-1], -1))
