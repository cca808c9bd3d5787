"""The stateful Core ML decoder: LLaMA blocks + LM head with the KV cache as Core ML *state*.

    Decoder.mlpackage   inputs   inputs_embeds [1, T, D]      fp16  (token embeddings and/or image features)
                                 causal_mask   [1, 1, T, P+T] fp16  (additive: 0 = visible, -3e4 = hidden)
                        states   key_cache     [L, 1, H_kv, C, Dh] fp16
                                 value_cache   [L, 1, H_kv, C, Dh] fp16
                        outputs  logits        [1, T, V]      fp16

``T`` (new tokens) and ``P + T`` (tokens in the cache after this call) are flexible, 1..C, with
C = ``max_context``. The mask's last dimension *is* the position: the call writes keys/values to
cache rows P..P+T-1 and rotates queries/keys for positions P..P+T-1, the slice-update pattern of
coremltools' stateful KV-cache guide, so the app passes no separate position input. Prefill is one
call with T = prompt length (or several chunks), decoding is T = 1 per step.

Attention is written here (RoPE from tables precomputed with the model's own rotary module, GQA by
repeating kv heads, ``scaled_dot_product_attention``, which coremltools lowers to iOS 18's fused
op) instead of using transformers' cache classes, which do not trace to Core ML state updates; so
is RMSNorm, made safe for the fp16 arithmetic Core ML runs it in. The LLaMA weights are shared,
not copied. ``StatefulDecoder`` runs in PyTorch too, so the tests check it against ``model.llm``
(prefill + step-by-step decode vs a full recompute).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgevlm.runtime.graph_io import CAUSAL_MASK, INPUTS_EMBEDS, KEY_CACHE, LOGITS, VALUE_CACHE

MASK_MIN = -3e4  # "hidden" in causal_mask: exp underflows to 0 in fp16, no inf arithmetic on device


@dataclass(frozen=True)
class DecoderDims:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    max_context: int

    @classmethod
    def of(cls, llm, max_context: int) -> "DecoderDims":
        c = llm.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, head_dim,
                   c.hidden_size, c.vocab_size, max_context)

    @property
    def cache_shape(self) -> tuple[int, int, int, int, int]:
        return (self.layers, 1, self.kv_heads, self.max_context, self.head_dim)

    def io_spec(self) -> dict:
        """Names and dims for the manifest ("T" and "P+T" are flexible, 1..max_context)."""
        return {"inputs": {INPUTS_EMBEDS: [1, "T", self.hidden], CAUSAL_MASK: [1, 1, "T", "P+T"]},
                "states": {KEY_CACHE: list(self.cache_shape), VALUE_CACHE: list(self.cache_shape)},
                "outputs": {LOGITS: [1, "T", self.vocab]}, "dtype": "float16",
                "flexible": {"T": [1, self.max_context], "P+T": [1, self.max_context]}}


def rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """LLaMA's RMSNorm, safe in fp16 (Core ML computes it in fp16, where any |x| > 256 squares to
    inf and zeroes the token; LLMs have such "massive activations"). Rows whose max |x| exceeds 1
    are divided by it first: RMSNorm is scale invariant, and for those rows eps / s^2 is negligible."""
    s = x.abs().amax(dim=-1, keepdim=True).clamp(min=1.0)  # [..., 1]
    y = x / s  # |y| <= 1, so y^2 and its mean cannot overflow
    var = y.pow(2).mean(dim=-1, keepdim=True)
    return norm.weight * (y * torch.rsqrt(var + norm.variance_epsilon / (s * s)))


def rotate_half(x: torch.Tensor, half: int) -> torch.Tensor:
    """[..., Dh] -> [-x2, x1] (HF LLaMA's RoPE layout); ``half`` is a Python int so tracing keeps
    it a constant (a traced ``shape // 2`` converts to a 1-element array Core ML's cast rejects)."""
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class StatefulDecoder(nn.Module):
    """``model.llm`` as one stateful step: (inputs_embeds, causal_mask) -> logits, KV cache in buffers.

    The LLaMA modules (norms, projections, MLPs, LM head) are shared with ``llm``, not copied."""

    def __init__(self, llm, max_context: int):
        super().__init__()
        self.dims = d = DecoderDims.of(llm, max_context)
        self.layers = llm.model.layers
        self.norm = llm.model.norm
        self.lm_head = llm.lm_head
        self.scale = float(self.layers[0].self_attn.scaling)
        self.default_scale = abs(self.scale - d.head_dim ** -0.5) < 1e-12
        pos = torch.arange(max_context)[None]  # [1, C]
        with torch.no_grad():
            cos, sin = llm.model.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)  # [1, C, Dh] each
        self.register_buffer("rope_cos", cos[0].float(), persistent=False)  # [C, Dh]
        self.register_buffer("rope_sin", sin[0].float(), persistent=False)
        # fp32 here; the converter stores them as fp16 Core ML states (see StateType in convert_decoder)
        self.register_buffer(KEY_CACHE, torch.zeros(d.cache_shape), persistent=False)
        self.register_buffer(VALUE_CACHE, torch.zeros(d.cache_shape), persistent=False)

    def reset(self) -> None:
        self.key_cache.zero_()
        self.value_cache.zero_()

    def _attention(self, i: int, attn, x: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, begin, end) -> torch.Tensor:
        d = self.dims
        t = x.shape[1]
        q = attn.q_proj(x).view(1, t, d.heads, d.head_dim).transpose(1, 2)  # [1, H, T, Dh]
        k = attn.k_proj(x).view(1, t, d.kv_heads, d.head_dim).transpose(1, 2)  # [1, H_kv, T, Dh]
        v = attn.v_proj(x).view(1, t, d.kv_heads, d.head_dim).transpose(1, 2)
        half = d.head_dim // 2
        q = q * cos + rotate_half(q, half) * sin
        k = k * cos + rotate_half(k, half) * sin
        self.key_cache[i : i + 1, :, :, begin:end, :] = k[None]  # rows P..P+T-1 of layer i
        self.value_cache[i : i + 1, :, :, begin:end, :] = v[None]
        keys = self.key_cache[i, :, :, :end, :]  # [1, H_kv, P+T, Dh]
        values = self.value_cache[i, :, :, :end, :]
        groups = d.heads // d.kv_heads
        if groups > 1:  # GQA: [1, H_kv, L, Dh] -> [1, H, L, Dh]
            keys = keys.repeat_interleave(groups, dim=1)
            values = values.repeat_interleave(groups, dim=1)
        if self.default_scale:  # no ``scale`` argument: coremltools then emits iOS 18's fused sdpa op
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # [1, H, T, Dh]
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)
        return attn.o_proj(out.transpose(1, 2).reshape(1, t, d.heads * d.head_dim))  # [1, T, D]

    def forward(self, inputs_embeds: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        t = inputs_embeds.shape[1]
        end = causal_mask.shape[-1]  # P + T
        begin = end - t  # P
        cos = self.rope_cos[begin:end]  # [T, Dh]; broadcasts over [1, H, T, Dh]
        sin = self.rope_sin[begin:end]
        h = inputs_embeds  # [1, T, D]
        for i, layer in enumerate(self.layers):
            x = rms_norm(h, layer.input_layernorm)
            h = h + self._attention(i, layer.self_attn, x, causal_mask, cos, sin, begin, end)
            h = h + layer.mlp(rms_norm(h, layer.post_attention_layernorm))
        return self.lm_head(rms_norm(h, self.norm))  # [1, T, V]


def causal_mask(past: int, new: int, dtype=np.float16) -> np.ndarray:
    """The additive mask for ``new`` tokens after ``past`` cached ones: [1, 1, new, past + new],
    0 where visible and MASK_MIN (finite, fp16-safe; coremltools uses the same) where hidden."""
    allowed = np.arange(past + new)[None, :] <= (past + np.arange(new))[:, None]  # [T, P+T]
    return np.where(allowed, 0.0, MASK_MIN).astype(dtype)[None, None]


def example_inputs(dims: DecoderDims, past: int = 2, new: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Trace inputs with T >= 2 and P >= 1 so no flexible size is specialised."""
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(1, new, dims.hidden, generator=g) * 0.02
    return embeds, torch.from_numpy(causal_mask(past, new, np.float32))


def convert_decoder(llm, max_context: int):
    """Trace ``StatefulDecoder`` and convert it: an fp16 ML Program for iOS 18 with two states."""
    import coremltools as ct

    from .coreml_vision import trace_and_convert

    module = StatefulDecoder(llm, max_context).eval()
    d = module.dims
    t = ct.RangeDim(lower_bound=1, upper_bound=max_context, default=1)
    total = ct.RangeDim(lower_bound=1, upper_bound=max_context, default=1)
    inputs = [ct.TensorType(name=INPUTS_EMBEDS, shape=(1, t, d.hidden), dtype=np.float16),
              ct.TensorType(name=CAUSAL_MASK, shape=(1, 1, t, total), dtype=np.float16)]
    states = [ct.StateType(wrapped_type=ct.TensorType(shape=d.cache_shape, dtype=np.float16), name=name)
              for name in (KEY_CACHE, VALUE_CACHE)]
    outputs = [ct.TensorType(name=LOGITS, dtype=np.float16)]
    return trace_and_convert(module, example_inputs(d), inputs, outputs, "decoder (LLaMA)", states=states)
