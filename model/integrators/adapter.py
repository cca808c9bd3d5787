"""Bottleneck adapters inside every decoder block (Houlsby et al. 2019), with a token integrator
for the image."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgevlm.runtime.errors import EdgeVLMError
from edgevlm.model.config import LLMConfig

from . import INTEGRATORS
from .base import placement
from .hooks import Hook, LLMHookIntegrator


class Bottleneck(nn.Module):
    """``up(gelu(down(h)))`` with ``up`` zero-initialised, so it adds exactly 0 at initialisation."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.act = nn.GELU()
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        return self.up(self.act(self.down(h)))


@INTEGRATORS.register("bottleneck_adapter")
class BottleneckAdapter(LLMHookIntegrator):
    """``h + W_up act(W_down h)`` on the output of the attention and of the MLP of every decoder
    layer (before each residual add), ``W_up`` zero-initialised: 2 * (2 * d * rank + rank + d)
    parameters per layer (0.53M at d 2048, rank 64).

    The adapters are in-block and image-independent: they only adapt the LLM. The image reaches the
    LLM as visual tokens from a token integrator held inside this one (kwarg ``tokens``, default
    ``ldpv2``; ``tokens_kwargs`` for its own kwargs), so ``num_tokens`` and ``forward`` are that
    integrator's and the model remains an ordinary VLM whose LLM carries trainable adapters. Unlike
    LoRA the adapters are nonlinear and cannot be merged into the LLM weights, which is why no
    export target runs them.
    """

    placement = "in_block"
    export_refusals = {
        "onnx": "the exported decoder graphs (traced and GroupQueryAttention) are the plain LLaMA decoder, "
                "without the adapter modules",
        "trt": "engines are built from the ONNX bundle, whose decoder lacks the adapters",
        "gguf": "llama.cpp's LLaMA graph has no adapter modules, and nonlinear adapters cannot be merged "
                "into the weights",
        "coreml": "the Core ML stateful decoder re-implements LLaMA attention without the adapter modules",
        "executorch": "the .pte's text_decoder re-implements LLaMA attention over a static KV cache without "
                      "the adapter modules",
    }

    def __init__(self, vision_dim: int, llm_dim: int, grid: int, llm: LLMConfig, rank: int = 64,
                 tokens: str = "ldpv2", tokens_kwargs: dict[str, Any] | None = None):
        super().__init__(llm_dim, llm)
        inner = INTEGRATORS.get(tokens)
        if placement(inner) != "tokens":
            raise EdgeVLMError(f"bottleneck_adapter: tokens={tokens!r} must name a token integrator")
        self.tokens = inner(vision_dim, llm_dim, grid, **(tokens_kwargs or {}))
        self.rank = rank
        n = self.dims["layers"]
        self.attn = nn.ModuleList(Bottleneck(llm_dim, rank) for _ in range(n))
        self.mlp = nn.ModuleList(Bottleneck(llm_dim, rank) for _ in range(n))

    def num_tokens(self, n_features: int) -> int:
        return self.tokens.num_tokens(n_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [B, N, Dv] -> [B, M, D]
        return self.tokens(features)

    def hooks(self) -> list[Hook]:
        n = self.dims["layers"]
        return ([(f"model.layers.{i}.self_attn", False, self._bind(self._after_attention, i)) for i in range(n)]
                + [(f"model.layers.{i}.mlp", False, self._bind(self._after_mlp, i)) for i in range(n)])

    def _after_attention(self, i: int, module: nn.Module, args: tuple, output: tuple):
        h = output[0]  # [B, T, D] attention output (after o_proj), before the residual add
        return (h + self.attn[i](h.to(self.attn[i].down.weight.dtype)).to(h.dtype), *output[1:])

    def _after_mlp(self, i: int, module: nn.Module, args: tuple, output: torch.Tensor):
        return output + self.mlp[i](output.to(self.mlp[i].down.weight.dtype)).to(output.dtype)  # [B, T, D]
