"""The base of integrators that act inside the LLM instead of (or besides) feeding it visual tokens.

An ``LLMHookIntegrator`` owns all its parameters (so they live under ``integrator.*`` in the EdgeVLM
state dict and the stage's ``integrator`` group trains them, whether the LLM is frozen, fully
trained or LoRA-wrapped) and reaches into the LLM only through forward hooks that EdgeVLM installs
once, at construction, with ``attach(llm)``. The LLM's own modules and state-dict keys (``llm.*``)
are untouched, so LoRA merging, official-checkpoint loading and LLM exports keep working.

Hooks are registered on the LLM's original module objects; peft's LoRA wraps those objects (their
forward still runs, hooks included) and ``merge_and_unload`` puts the same objects back, so the
hooks survive a LoRA stage. Hook callables are ``functools.partial`` of bound methods (deep-copyable
together with the model), never closures.

Per-image conditioning (vlora, gated_prefix): ``image_weights(features[K, N, Dv]) -> [K, ...]``
computes one tensor per image; ``sample_weights`` sums each sample's images into ``[B, ...]``; the
LLM runs inside ``conditioned(weights)``, which the hooks read. Outside it they add nothing that
depends on an image.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from edgevlm.runtime.errors import EdgeVLMError
from edgevlm.model.config import LLMConfig


def default_llm_config(llm_dim: int) -> LLMConfig:
    """A MobileLLaMA-1.4B-like layout of width ``llm_dim`` (head_dim 128 where it divides)."""
    heads = llm_dim // 128 if llm_dim % 128 == 0 else 1
    return LLMConfig(hidden_size=llm_dim, intermediate_size=llm_dim * 11 // 4, num_attention_heads=heads,
                     num_key_value_heads=heads, num_hidden_layers=24)


def llm_dims(llm: LLMConfig) -> dict[str, int]:
    """Widths the hooks need: hidden, heads, kv_heads, head_dim, q_dim, kv_dim, layers."""
    head_dim = llm.hidden_size // llm.num_attention_heads
    return {"hidden": llm.hidden_size, "heads": llm.num_attention_heads, "kv_heads": llm.num_key_value_heads,
            "head_dim": head_dim, "q_dim": llm.num_attention_heads * head_dim,
            "kv_dim": llm.num_key_value_heads * head_dim, "layers": llm.num_hidden_layers,
            "intermediate": llm.intermediate_size}


# One forward hook: (path of the LLM module, with_kwargs, callable(module, args, [kwargs,] output)).
Hook = tuple[str, bool, Callable]


class LLMHookIntegrator(nn.Module):
    """Base class; subclasses set ``placement`` and implement ``hooks()`` (+ ``image_weights``)."""

    placement = "in_block"
    gguf_projector = None

    def __init__(self, llm_dim: int, llm: LLMConfig):
        super().__init__()
        if llm.hidden_size != llm_dim:
            raise EdgeVLMError(f"integrator built for LLM width {llm_dim} but the LLM config has {llm.hidden_size}")
        self.dims = llm_dims(llm)
        self.llm_dim = llm_dim
        self._handles: list = []
        self._condition: torch.Tensor | None = None  # [B, ...] while inside conditioned()

    # ---- what subclasses provide ------------------------------------------------------------
    def hooks(self) -> list[Hook]:
        raise NotImplementedError

    def image_weights(self, features: torch.Tensor) -> torch.Tensor | None:
        """Per-image LLM conditioning [K, ...] from features [K, N, Dv]; None: the integrator has none."""
        return None

    # ---- the LLM modules it touches ---------------------------------------------------------
    def touched_modules(self) -> list[str]:
        """Paths (inside LlamaForCausalLM) of the modules this integrator hooks."""
        return sorted({path for path, _, _ in self.hooks()})

    def attach(self, llm: nn.Module) -> None:
        """Install the forward hooks on ``llm`` (a LlamaForCausalLM); idempotent."""
        self.detach()
        for path, with_kwargs, fn in self.hooks():
            module = llm.get_submodule(path)
            self._handles.append(module.register_forward_hook(fn, with_kwargs=with_kwargs))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _bind(self, method: Callable, *args) -> Callable:
        return functools.partial(method, *args)

    # ---- per-image conditioning -------------------------------------------------------------
    def sample_weights(self, weights: torch.Tensor | None, counts: Sequence[int]) -> torch.Tensor | None:
        """Per-image weights [K, ...] (placeholder order across the batch) -> per-sample [B, ...]:
        the sum over each sample's images, zeros for a sample without one. None passes through."""
        if weights is None:
            return None
        if sum(counts) != weights.shape[0]:
            raise ValueError(f"{sum(counts)} image placeholders but {weights.shape[0]} image weights")
        out, start = [], 0
        for n in counts:
            out.append(weights[start:start + n].sum(0))  # zeros when n == 0
            start += n
        return torch.stack(out)  # [B, ...]

    @contextlib.contextmanager
    def conditioned(self, weights: torch.Tensor | None) -> Iterator[None]:
        """Run the LLM inside this block to condition it on per-sample ``weights`` [B, ...]."""
        previous, self._condition = self._condition, weights
        try:
            yield
        finally:
            self._condition = previous

    def condition_for(self, batch: int) -> torch.Tensor | None:
        """The active per-sample weights for a batch of ``batch`` rows ([1, ...] broadcasts)."""
        c = self._condition
        if c is None or c.shape[0] in (1, batch):
            return c
        raise ValueError(f"conditioning holds {c.shape[0]} samples but the LLM runs a batch of {batch}")

    def num_tokens(self, n_features: int) -> int:
        return 0

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [B, N, Dv] -> [B, 0, D]
        """No visual tokens: the image reaches the LLM through ``image_weights`` and the hooks."""
        return features.new_zeros(features.shape[0], 0, self.llm_dim)

