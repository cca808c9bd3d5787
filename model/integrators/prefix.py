"""LLaMA-Adapter-style gated prefix (Zhang et al. 2023; image feature on the prompts as in
LLaMA-Adapter V2): learned prompts attended by the top decoder layers through a separate,
zero-gated softmax. The image conditions the LLM without any visual token in the sequence."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgevlm.runtime.errors import EdgeVLMError
from edgevlm.model.config import LLMConfig

from . import INTEGRATORS
from .hooks import Hook, LLMHookIntegrator


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@INTEGRATORS.register("gated_prefix")
class GatedPrefix(LLMHookIntegrator):
    """``prompt_len`` learned prompts [K, d_t] for each of the top ``layers`` decoder layers (default:
    all). In layer l, with q the layer's rotary queries and the prompts P_l + v_img run through the
    layer's own k/v projections (no rotary: they have no position)::

        attn_out += o_proj(tanh(g_l) * softmax(q K_p^T / sqrt(d_h)) V_p)      per head, g_l = 0 at init

    The prefix softmax is separate from the sequence's, the gate ``g_l`` [heads] starts at zero (so the
    untrained model is exactly the LLM alone), and ``v_img = Linear(d_v, d_t)(mean over patches)`` is
    added to every prompt (samples without an image use the bare prompts). k/v of the prompts are
    [K, num_key_value_heads * head_dim], repeated over the query groups (GQA as in the LLM).

    Params: layers * K * d_t + layers * heads + d_v * d_t + d_t. Cost per token and prefixed layer:
    one extra q projection (recomputed in the hook, so LoRA on q_proj is honoured; d_t^2 MACs) plus
    K-key attention; per call the prompts' k/v projections (2 K d_t kv_dim MACs). The image is one
    pooled vector, so fine spatial detail is lost compared with visual tokens.
    """

    placement = "in_block"
    export_refusals = {
        "onnx": "the exported decoder graphs are the plain LLaMA decoder: no gated prefix attention, no input "
                "for the image feature",
        "trt": "engines are built from the ONNX bundle, whose decoder lacks the gated prefix attention",
        "gguf": "llama.cpp's LLaMA graph has no gated prompt attention, and the image reaches the LLM through "
                "the prompts, not mmproj embeddings",
        "coreml": "the Core ML stateful decoder re-implements LLaMA attention without the gated prefix",
        "executorch": "the .pte's text_decoder re-implements LLaMA attention over a static KV cache without "
                      "the gated prefix",
    }

    def __init__(self, vision_dim: int, llm_dim: int, grid: int, llm: LLMConfig, prompt_len: int = 10,
                 layers: int | None = None):
        super().__init__(llm_dim, llm)
        n = self.dims["layers"] if layers is None else int(layers)
        if not 1 <= n <= self.dims["layers"] or prompt_len < 1:
            raise EdgeVLMError(f"gated_prefix: layers must be in 1..{self.dims['layers']} and prompt_len >= 1, "
                               f"got layers={layers}, prompt_len={prompt_len}")
        self.first = self.dims["layers"] - n  # prefixed layers: first .. layers-1 (the top ones)
        self.prompts = nn.Parameter(torch.randn(n, prompt_len, llm_dim))  # [L', K, D], RMSNorm-output scale
        self.gates = nn.Parameter(torch.zeros(n, self.dims["heads"]))  # [L', H]; tanh(0) = 0
        self.image_proj = nn.Linear(vision_dim, llm_dim)

    def image_weights(self, features: torch.Tensor) -> torch.Tensor:  # [K, N, Dv] -> [K, D]
        return self.image_proj(features.mean(dim=1))

    def hooks(self) -> list[Hook]:
        return [(f"model.layers.{self.first + i}.self_attn", True, self._bind(self._prefix, i))
                for i in range(self.prompts.shape[0])]

    def _prompt_kv(self, i: int, attn: nn.Module, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.dims
        p = self.prompts[i].to(dtype)[None]  # [1, K, D]
        cond = self.condition_for(batch)  # [B or 1, D] or None
        if cond is not None:
            p = p + cond.to(dtype)[:, None]  # [B, K, D]
        groups = d["heads"] // d["kv_heads"]
        k = attn.k_proj(p).view(p.shape[0], -1, d["kv_heads"], d["head_dim"]).transpose(1, 2)  # [b, Hkv, K, Dh]
        v = attn.v_proj(p).view(p.shape[0], -1, d["kv_heads"], d["head_dim"]).transpose(1, 2)
        return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # [b, H, K, Dh]

    def _prefix(self, i: int, module: nn.Module, args: tuple, kwargs: dict, output: tuple):
        d = self.dims
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [B, T, D]
        cos, sin = kwargs["position_embeddings"]  # [B, T, Dh] each
        b, t, _ = h.shape
        q = module.q_proj(h).view(b, t, d["heads"], d["head_dim"]).transpose(1, 2)  # [B, H, T, Dh]
        q = q * cos[:, None] + rotate_half(q) * sin[:, None]  # rotary, as the layer's own queries
        k, v = self._prompt_kv(i, module, b, h.dtype)  # [b, H, K, Dh]
        scores = torch.matmul(q, k.transpose(-1, -2)) * d["head_dim"] ** -0.5  # [B, H, T, K]
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        gate = torch.tanh(self.gates[i]).to(q.dtype).view(1, -1, 1, 1)  # [1, H, 1, 1]
        out = (torch.matmul(probs, v) * gate).transpose(1, 2).reshape(b, t, d["q_dim"])  # [B, T, H*Dh]
        return (output[0] + module.o_proj(out), *output[1:])
