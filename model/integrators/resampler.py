"""Single-layer attention resamplers: M learned queries cross-attend to the patch features.

``resampler`` (Qwen-VL)::

    kv = LN_kv(x Wkv)                                  x [B, N, Dv] -> [B, N, D]
    q  = LN_q(query) + sincos(query grid)              [M, D], M a perfect square
    y  = Attn(q, kv + sincos(patch grid), kv)          [B, M, D]
    out = LN_post(y) P                                 [B, M, D]

``minicpmv_resampler`` (MiniCPM-V 2.5+, the form llama.cpp's ``resampler`` projector runs): the
same without the query position embedding, so M can be any count.

Both use D = the LLM width and ``D // 128`` heads (one head where D is not a multiple of 128), kv
projection without bias, ``P`` without bias. Position tables are fixed 2-D sin-cos buffers (MAE
layout, not trained, not saved). Qwen-VL interpolates its query-grid table to the patch grid for
the keys; here the keys' table is computed for the patch grid directly, as MiniCPM-V does.
"""
from __future__ import annotations

import torch
from torch import nn

from edgevlm.runtime.errors import EdgeVLMError

from . import INTEGRATORS
from .base import check_grid
from .blocks import Attention, check_heads, default_heads, sincos_2d, square_side


class _Resampler(nn.Module):
    name = ""
    query_pos = False

    def __init__(self, vision_dim: int, llm_dim: int, grid: int, num_queries: int, num_heads: int | None,
                 eps: float):
        super().__init__()
        if not isinstance(num_queries, int) or num_queries < 1:
            raise EdgeVLMError(f"integrator {self.name!r}: num_queries must be a positive integer, "
                               f"got {num_queries!r}")
        heads = check_heads(self.name, llm_dim, default_heads(llm_dim) if num_heads is None else num_heads)
        self.grid, self.num_heads, self.eps = grid, heads, eps
        self.query = nn.Parameter(torch.empty(num_queries, llm_dim))  # [M, D]
        nn.init.trunc_normal_(self.query, std=0.02)
        self.kv_proj = nn.Linear(vision_dim, llm_dim, bias=False)
        self.ln_q = nn.LayerNorm(llm_dim, eps=eps)
        self.ln_kv = nn.LayerNorm(llm_dim, eps=eps)
        self.attn = Attention(llm_dim, heads)
        self.ln_post = nn.LayerNorm(llm_dim, eps=eps)
        self.proj = nn.Linear(llm_dim, llm_dim, bias=False)  # Qwen / MiniCPM's ``x @ proj``: weight = proj^T
        nn.init.normal_(self.proj.weight, std=llm_dim ** -0.5)
        self.register_buffer("pos_k", sincos_2d(llm_dim, grid), persistent=False)  # [N, D]
        if self.query_pos:
            side = square_side(num_queries, f"{self.name} num_queries")
            self.register_buffer("pos_q", sincos_2d(llm_dim, side), persistent=False)  # [M, D]

    def num_tokens(self, n_features: int) -> int:
        return self.query.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, Dv] -> [B, M, D]
        check_grid(self.name, x.shape[1], self.grid)
        kv = self.ln_kv(self.kv_proj(x))  # [B, N, D]
        q = self.ln_q(self.query)  # [M, D]
        if self.query_pos:
            q = q + self.pos_q
        q = q.expand(x.shape[0], -1, -1)  # [B, M, D]
        y = self.attn(q, kv + self.pos_k, kv)  # [B, M, D]
        return self.proj(self.ln_post(y))


@INTEGRATORS.register("resampler")
class QwenResampler(_Resampler):
    """Qwen-VL's resampler: ``num_queries`` (a perfect square, default 144) queries with 2-D
    sin-cos position embedding on queries and keys. kwargs: num_queries, num_heads, eps (1e-6)."""

    name = "resampler"
    query_pos = True
    gguf_projector = None
    export_refusals = {"gguf": "llama.cpp has no Qwen-VL (v1) resampler; its `resampler` projector "
                               "(MiniCPM-V) adds no position embedding to the queries, and a per-query "
                               "offset cannot be folded into its LayerNorm'd query tensor"}

    def __init__(self, vision_dim: int, llm_dim: int, grid: int, *, num_queries: int = 144,
                 num_heads: int | None = None, eps: float = 1e-6):
        super().__init__(vision_dim, llm_dim, grid, num_queries, num_heads, eps)


@INTEGRATORS.register("minicpmv_resampler")
class MiniCPMVResampler(_Resampler):
    """MiniCPM-V's resampler: key position embedding only. kwargs: num_queries (default 144),
    num_heads (default D // 128), eps (default 1e-5, CLIP's layer_norm_eps: llama.cpp runs the
    resampler's LayerNorms with the vision tower's epsilon).

    llama.cpp (projector type ``resampler``) runs it exactly when D is a multiple of 128 with
    D // 128 heads (its graph hard-codes 128-wide heads), eps equals the tower's, and the patch
    grid is at most 70x70; the GGUF exporter checks each of these."""

    name = "minicpmv_resampler"
    gguf_projector = "resampler"

    def __init__(self, vision_dim: int, llm_dim: int, grid: int, *, num_queries: int = 144,
                 num_heads: int | None = None, eps: float = 1e-5):
        super().__init__(vision_dim, llm_dim, grid, num_queries, num_heads, eps)

