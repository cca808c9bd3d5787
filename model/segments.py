"""Packed sequences in the model's forward: segment ids -> the 4-D attention mask and position ids.

``train/packing.py`` builds the segments (several single-turn questions about one image in one
sequence); the model only needs to turn them into what the LLM takes.
"""
from __future__ import annotations

import torch


def attention_and_positions(segments: list[torch.Tensor], length: int, dtype: torch.dtype
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Spliced segment ids per sample ([T_i] each; all zeros = an ordinary causal sequence) ->
    (additive mask [B, 1, L, L] in ``dtype``, position ids [B, L]).

    Query q may see key k when k <= q and k is in the prefix (segment 0) or in q's own segment;
    padding rows see only themselves (keeps the softmax finite; their labels are -100)."""
    device = segments[0].device
    b = len(segments)
    allowed = torch.zeros(b, length, length, dtype=torch.bool, device=device)
    positions = torch.zeros(b, length, dtype=torch.long, device=device)
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()  # [L, L]
    eye = torch.eye(length, dtype=torch.bool, device=device)
    for i, s in enumerate(segments):
        t = s.shape[0]
        same = (s[:, None] == s[None, :]) | (s[None, :] == 0)  # [T, T]
        allowed[i] = eye
        allowed[i, :t, :t] = same & causal[:t, :t]
        n_prefix = int((s == 0).sum())
        pos = torch.arange(t, device=device)
        for k in s.unique().tolist():
            if k:
                idx = (s == k).nonzero().flatten()
                pos[idx] = n_prefix + torch.arange(idx.numel(), device=device)
        positions[i, :t] = pos
        positions[i, t:] = torch.arange(t, length, device=device)
    mask = torch.zeros(b, 1, length, length, dtype=dtype, device=device)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return mask, positions
