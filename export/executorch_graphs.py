"""The three methods of an ExecuTorch ``.pte``, as ExecuTorch's multimodal runner calls them
(``executorch/extension/llm/runner``: ``multimodal_prefiller.cpp``, ``multimodal_decoder_runner.h``):

    vision_encoder   pixel_values float32 [1, 3, S, S] -> image_features [1, M, D]
                     (vision tower + integrator; the runner hands it the image as float CHW data
                     plus a batch dimension, so the bundle's preprocessing happens before it)
    token_embedding  input_ids int64 [1, T] -> embeddings [1, T, D]
    text_decoder     embeddings [1, T, D], input_pos int64 [1] -> logits [1, V] of the last position

The decoder keeps a static KV cache as mutable buffers [1, H_kv, max_seq_len, Dh] per layer: the
new positions ``input_pos .. input_pos + T - 1`` are written with ``index_copy_`` and every query
sees the keys at positions <= its own, so positions after it (left by an earlier, longer sequence)
never count. That is what lets a caller keep a prefix: it restarts at ``input_pos = keep``.

The LLaMA blocks are the model's own modules (projections, norms, MLP, rotary embedding);
only attention over the static cache is written here.
"""
from __future__ import annotations

import torch
from torch import nn

from .onnx_graphs import EmbedTokens, VisionEncoder

METHODS = ("vision_encoder", "token_embedding", "text_decoder")  # the runner's kVisionEncoderMethod, ...


class StaticCacheDecoder(nn.Module):
    """LLaMA decoder + LM head over a static KV cache (see the module docstring)."""

    def __init__(self, model, max_seq_len: int):
        super().__init__()
        c = model.cfg.llm
        self.llm = model.llm
        self.n_heads, self.n_kv = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = c.hidden_size // c.num_attention_heads
        self.max_seq_len = max_seq_len
        for i in range(c.num_hidden_layers):
            shape = (1, self.n_kv, max_seq_len, self.head_dim)
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape), persistent=False)

    def forward(self, embeddings: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        t = embeddings.shape[1]
        positions = input_pos[:1] + torch.arange(t, dtype=torch.long)  # [T]
        inner = self.llm.model
        cos, sin = inner.rotary_emb(embeddings, positions[None])  # [1, T, Dh] each
        keys = torch.arange(self.max_seq_len, dtype=torch.long)
        mask = (keys[None, :] <= positions[:, None])[None, None]  # [1, 1, T, max_seq_len]
        h = embeddings
        for i, layer in enumerate(inner.layers):
            h = h + self._attention(layer.self_attn, layer.input_layernorm(h), cos, sin, positions, mask, i)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = inner.norm(h[:, -1:])  # the runner samples the last position only
        return self.llm.lm_head(h)[:, 0]  # [1, V]

    def _attention(self, att, x, cos, sin, positions, mask, i: int) -> torch.Tensor:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        b, t, _ = x.shape
        q = att.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = att.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = att.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k_cache, v_cache = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
        k_cache.index_copy_(2, positions, k)
        v_cache.index_copy_(2, positions, v)
        rep = self.n_heads // self.n_kv
        keys, values = k_cache, v_cache
        if rep > 1:
            keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=att.scaling)
        return att.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


def method_modules(model, max_seq_len: int) -> dict[str, nn.Module]:
    """method name -> the eval-mode module ExecuTorch runs for it."""
    return {"vision_encoder": VisionEncoder(model).eval(), "token_embedding": EmbedTokens(model).eval(),
            "text_decoder": StaticCacheDecoder(model, max_seq_len).eval()}


def example_args(model, method: str, seq: int = 3, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs for export and for validation (batch 1, as the runner calls each method)."""
    c = model.cfg
    g = torch.Generator().manual_seed(seed)
    if method == "vision_encoder":
        return (torch.randn(1, 3, c.vision.image_size, c.vision.image_size, generator=g),)
    if method == "token_embedding":
        return (torch.randint(0, c.llm.vocab_size, (1, seq), generator=g),)
    return (torch.randn(1, seq, c.llm.hidden_size, generator=g) * 0.02, torch.tensor([0], dtype=torch.long))


def dynamic_shapes(method: str, max_seq_len: int):
    """The token axis is dynamic (1 .. max_seq_len) for token_embedding and text_decoder."""
    from torch.export import Dim

    if method == "vision_encoder":
        return None
    seq = Dim("seq", min=1, max=max_seq_len)
    if method == "token_embedding":
        return ({1: seq},)
    return ({1: seq}, None)


def export_method(module: nn.Module, model, method: str, max_seq_len: int):
    """``torch.export`` of one method (an ``ExportedProgram``)."""
    with torch.no_grad():
        return torch.export.export(module, example_args(model, method), dynamic_shapes=dynamic_shapes(method, max_seq_len),
                                   strict=False)
