"""A light BLIP-2 Q-Former (``qformer``): learned queries refined by a few BERT-style layers.

    img = LN_vision(features)                                   [B, N, Dv]
    q   = LN(query)                                             [B, M, H]
    per layer l:  q = LN(q + SelfAttn(q))
                  q = LN(q + CrossAttn(q, img))   if l % cross_attention_every == 0
                  q = LN(q + W2 GELU(W1 q))                     (post-LN, as BERT)
    out = Linear(H, D)(q)                                       [B, M, D]

Cross-attention follows BLIP-2's ``cross_attention_freq=2`` by default: layers 0, 2, 4 attend to
the image, layers 1, 3, 5 only refine the queries (``cross_attention_every=1`` puts it in every
layer). BLIP-2 has 12 layers of width 768; this one keeps the width and head count (12 heads) and
takes 2 to 6 layers. Its input LayerNorm on the image features stands for BLIP-2's ``ln_vision``
(the CLIP features taken here are hidden states before any final norm). Dropout is omitted, the
text branch (BLIP-2's separate text FFNs) does not exist.
"""
from __future__ import annotations

import torch
from torch import nn

from edgevlm.runtime.errors import EdgeVLMError

from . import INTEGRATORS
from .base import check_grid
from .blocks import Attention, check_heads

BERT_EPS = 1e-12  # BERT / BLIP-2 Q-Former layer_norm_eps


class QFormerLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int, vision_dim: int, cross: bool):
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.ln_self = nn.LayerNorm(dim, eps=BERT_EPS)
        self.cross_attn = Attention(dim, heads, kv_dim=vision_dim) if cross else None
        self.ln_cross = nn.LayerNorm(dim, eps=BERT_EPS) if cross else None
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, dim))
        self.ln_ffn = nn.LayerNorm(dim, eps=BERT_EPS)

    def forward(self, q: torch.Tensor, img: torch.Tensor) -> torch.Tensor:  # [B, M, H], [B, N, Dv]
        q = self.ln_self(q + self.self_attn(q, q, q))
        if self.cross_attn is not None:
            q = self.ln_cross(q + self.cross_attn(q, img, img))
        return self.ln_ffn(q + self.ffn(q))  # [B, M, H]


@INTEGRATORS.register("qformer")
class QFormer(nn.Module):
    """kwargs: ``num_queries`` (32), ``num_layers`` (2, allowed 2-6), ``hidden_dim`` (768),
    ``num_heads`` (12), ``ffn_dim`` (4 x hidden), ``cross_attention_every`` (2, or 1)."""

    gguf_projector = None
    export_refusals = {"gguf": "llama.cpp has no Q-Former projector for images (its only Q-Former, "
                               "granite_speech, is an audio projector with a windowed layout)"}
    LAYERS = range(2, 7)

    def __init__(self, vision_dim: int, llm_dim: int, grid: int, *, num_queries: int = 32, num_layers: int = 2,
                 hidden_dim: int = 768, num_heads: int = 12, ffn_dim: int | None = None,
                 cross_attention_every: int = 2):
        super().__init__()
        if num_layers not in self.LAYERS:
            raise EdgeVLMError(f"qformer num_layers must be 2..6, got {num_layers!r}")
        if cross_attention_every not in (1, 2):
            raise EdgeVLMError(f"qformer cross_attention_every must be 1 or 2, got {cross_attention_every!r}")
        if not isinstance(num_queries, int) or num_queries < 1:
            raise EdgeVLMError(f"qformer num_queries must be a positive integer, got {num_queries!r}")
        heads = check_heads("qformer", hidden_dim, num_heads)
        self.grid = grid
        self.query = nn.Parameter(torch.empty(num_queries, hidden_dim))  # [M, H]
        nn.init.trunc_normal_(self.query, std=0.02)
        self.ln_query = nn.LayerNorm(hidden_dim, eps=BERT_EPS)
        self.ln_vision = nn.LayerNorm(vision_dim)
        self.layers = nn.ModuleList(
            QFormerLayer(hidden_dim, heads, ffn_dim or 4 * hidden_dim, vision_dim, i % cross_attention_every == 0)
            for i in range(num_layers))
        self.proj = nn.Linear(hidden_dim, llm_dim)

    def num_tokens(self, n_features: int) -> int:
        return self.query.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, Dv] -> [B, M, D]
        check_grid("qformer", x.shape[1], self.grid)
        img = self.ln_vision(x)  # [B, N, Dv]
        q = self.ln_query(self.query).expand(x.shape[0], -1, -1)  # [B, M, H]
        for layer in self.layers:
            q = layer(q, img)
        return self.proj(q)  # [B, M, D]
