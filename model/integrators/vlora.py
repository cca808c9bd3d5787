"""VLoRA (Ma et al. 2024, "Visual Perception by Large Language Model's Weights"): parameter-space
alignment. The image becomes per-image low-rank deltas on LLM weights; the LLM sees no visual token.
"""
from __future__ import annotations

import torch
from torch import nn

from edgevlm.runtime.errors import EdgeVLMError
from edgevlm.model.config import LLMConfig

from . import INTEGRATORS
from .base import check_grid
from .hooks import Hook, LLMHookIntegrator

# target -> (module path inside a decoder layer, input width key, output width key) in llm_dims()
TARGETS = {"q": ("self_attn.q_proj", "hidden", "q_dim"), "k": ("self_attn.k_proj", "hidden", "kv_dim"),
           "v": ("self_attn.v_proj", "hidden", "kv_dim"), "o": ("self_attn.o_proj", "q_dim", "hidden"),
           "mlp": ("mlp", "hidden", "hidden")}  # mlp: a low-rank branch parallel to the whole MLP


class WeightGenerator(nn.Module):
    """Perceptual-weights generator for one target type: image features -> one A per selected layer.

    Linear(d_v, dim) + learned positions over the patches (the memory), ``depth`` pre-norm decoder
    blocks (self-attention among ``n_queries`` learned queries, cross-attention to the memory, FFN),
    LayerNorm, head Linear(dim, d_in * rank)."""

    def __init__(self, vision_dim: int, n_patches: int, dim: int, depth: int, n_queries: int, d_in: int,
                 rank: int):
        super().__init__()
        self.d_in, self.rank = d_in, rank
        self.proj = nn.Linear(vision_dim, dim)
        self.pos = nn.Parameter(torch.randn(1, n_patches, dim) * 0.02)
        self.queries = nn.Parameter(torch.randn(1, n_queries, dim) * 0.02)
        self.blocks = nn.ModuleList(nn.TransformerDecoderLayer(
            dim, max(1, dim // 64), 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, d_in * rank)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [K, N, Dv] -> [K, Q, d_in, r]
        k = features.shape[0]
        memory = self.proj(features) + self.pos  # [K, N, dim]
        q = self.queries.repeat(k, 1, 1)  # [K, Q, dim] (a copy: FlopCounterMode rejects no-grad views)
        for block in self.blocks:
            q = block(q, memory)
        a = self.head(self.norm(q))  # [K, Q, d_in * r]
        return a.view(k, q.shape[1], self.d_in, self.rank) * self.d_in ** -0.5  # x A stays O(|x|)


@INTEGRATORS.register("vlora")
class VLoRA(LLMHookIntegrator):
    """Per-image low-rank deltas on q, k, v, o (and a branch parallel to the MLP) of every ``every``-th
    decoder layer (0, every, 2*every, ...): ``y = W x + (x A_img) B^T``. One generator per target type
    gives ``A_img`` [d_in, rank] for each selected layer; ``B`` [d_out, rank] is learned per target and
    layer and starts at zero, so the untrained model is exactly the LLM alone. k/v deltas are sized
    to the KV projections (num_key_value_heads * head_dim), so grouped-query LLMs are handled.

    Cost (see ``cost()``; numbers at MobileVLM-1.7B widths with the defaults dim 512, depth 8,
    rank 64, every 4, five targets): the five generators hold ~508M parameters -- more than a third
    of the 1.4B LLM -- and cost ~33 GFLOPs per image (their cross-attention over 576 patches and the
    d_t * r heads dominate). Applying the deltas unmerged costs ~16 MFLOPs per processed token
    (~0.6% of the LLM's ~2.5 GFLOPs/token) and ~15.7 MB of fp32 A matrices per image. What it saves:
    the prefill of the visual tokens a token integrator would add (144 for ldp/ldpv2: ~355 GFLOPs)
    and their KV cache. The deltas cannot be merged into quantised weights without rewriting them
    per image, so no export target runs it (see ``export_refusals``).
    """

    placement = "weights"
    export_refusals = {
        "onnx": "the exported decoder graphs are the plain LLaMA decoder (inputs_embeds + KV cache): "
                "no input for vlora's per-image weight deltas",
        "trt": "engines are built from the ONNX bundle, whose decoder has no per-image weight deltas",
        "gguf": "llama.cpp only splices mmproj embeddings into the sequence; it cannot apply per-image "
                "weight deltas (its LoRA adapters are static)",
        "coreml": "the Core ML stateful decoder is the plain LLaMA decoder: no input for per-image weight deltas",
        "executorch": "the .pte's text_decoder is the plain LLaMA decoder over a static KV cache: no input "
                      "for per-image weight deltas",
    }

    def __init__(self, vision_dim: int, llm_dim: int, grid: int, llm: LLMConfig, dim: int = 512,
                 depth: int = 8, rank: int = 64, every: int = 4,
                 targets: tuple[str, ...] | list[str] | str = ("q", "k", "v", "o", "mlp")):
        super().__init__(llm_dim, llm)
        targets = [targets] if isinstance(targets, str) else list(targets)
        bad = [t for t in targets if t not in TARGETS]
        if not targets or bad or len(set(targets)) != len(targets) or every < 1 or rank < 1:
            raise EdgeVLMError(f"vlora: targets must be distinct names from {', '.join(TARGETS)} "
                               f"(got {targets}); every and rank must be >= 1")
        self.grid, self.rank, self.dim, self.depth = grid, rank, dim, depth
        self.targets = targets
        self.layers = list(range(0, self.dims["layers"], every))  # decoder layers that get deltas
        d = self.dims
        self.generators = nn.ModuleDict({t: WeightGenerator(vision_dim, grid * grid, dim, depth, len(self.layers),
                                                            d[TARGETS[t][1]], rank) for t in targets})
        self.lora_b = nn.ParameterDict({f"{t}_{layer}": nn.Parameter(torch.zeros(d[TARGETS[t][2]], rank))
                                        for t in targets for layer in self.layers})  # B [d_out, r], zero

    def image_weights(self, features: torch.Tensor) -> torch.Tensor:  # [K, N, Dv] -> [K, T, Q, d_in, r]
        check_grid("vlora", features.shape[1], self.grid)
        if len({self.dims[TARGETS[t][1]] for t in self.targets}) != 1:
            raise EdgeVLMError("vlora: targets with different input widths cannot be stacked")
        return torch.stack([self.generators[t](features) for t in self.targets], dim=1)

    def hooks(self) -> list[Hook]:
        return [(f"model.layers.{layer}.{TARGETS[t][0]}", False, self._bind(self._add_delta, ti, qi, f"{t}_{layer}"))
                for ti, t in enumerate(self.targets) for qi, layer in enumerate(self.layers)]

    def _add_delta(self, ti: int, qi: int, key: str, module: nn.Module, args: tuple, output: torch.Tensor):
        x = args[0]  # [B, T, d_in]
        weights = self.condition_for(x.shape[0])  # [B, T_targets, Q, d_in, r] or None
        if weights is None:
            return None
        a = weights[:, ti, qi].to(x.dtype)  # [B or 1, d_in, r]
        xa = torch.matmul(x, a)  # [B, T, r]
        return output + xa @ self.lora_b[key].to(x.dtype).t()  # + [B, T, d_out]

    # ---- cost accounting (analytic; FLOPs = 2 x multiply-adds) ---------------------------------
    def cost(self, n_features: int | None = None, baseline_tokens: int = 144) -> dict[str, float]:
        """Generator FLOPs/params per image, per-token delta cost, and the prefill it saves versus a
        token integrator adding ``baseline_tokens`` visual tokens (144: ldp/ldpv2)."""
        d = self.dims
        n = n_features or self.grid * self.grid
        q, dim, r = len(self.layers), self.dim, self.rank
        block = (2 * q * 4 * dim * dim + 4 * q * q * dim  # self-attention: projections, scores + AV
                 + 2 * q * 2 * dim * dim + 2 * n * 2 * dim * dim + 4 * q * n * dim  # cross-attention
                 + 2 * q * 8 * dim * dim)  # FFN dim -> 4 dim -> dim
        gen_flops = sum(2 * n * self.generators[t].proj.in_features * dim + self.depth * block
                        + 2 * q * dim * d[TARGETS[t][1]] * r for t in self.targets)
        apply_tok = sum(2 * r * (d[TARGETS[t][1]] + d[TARGETS[t][2]]) for t in self.targets) * q
        merge = sum(2 * d[TARGETS[t][1]] * r * d[TARGETS[t][2]] for t in self.targets) * q
        layer_params = 2 * d["hidden"] * d["q_dim"] + 2 * d["hidden"] * d["kv_dim"] + 3 * d["hidden"] * d["intermediate"]
        llm_tok = 2 * d["layers"] * layer_params  # decoder matmuls per token (attention scores excluded)
        saved = baseline_tokens * llm_tok
        gen_params = sum(p.numel() for p in self.generators.parameters())
        return {
            "generator_params": gen_params, "b_params": sum(p.numel() for p in self.lora_b.parameters()),
            "generator_flops_per_image": gen_flops,
            "a_values_per_image": len(self.targets) * q * d["hidden"] * r,
            "delta_flops_per_token": apply_tok,
            "merge_flops_per_image": merge,  # alternative: fold A B^T into W once per image
            "llm_flops_per_token": llm_tok, "delta_overhead_per_token": apply_tok / llm_tok,
            "baseline_visual_tokens": baseline_tokens, "prefill_flops_saved": saved,
            "kv_cache_values_saved": 2 * d["layers"] * d["kv_dim"] * baseline_tokens,
            "net_flops_saved_per_image": saved - gen_flops,
            "break_even_tokens": (saved - gen_flops) / apply_tok,  # tokens after which deltas eat the saving
        }
