"""Analytic FLOPs and bytes of each stage of a MobileVLM-style model: vision tower, integrator,
prefill, decode, KV cache, weights in memory.

Everything works on a plain ``shape`` dict (numbers only, JSON-serialisable, no torch), so the
report and the projection run anywhere. ``model_shape(model)`` / ``preset_shape(name)`` build it
from a loaded model or a preset (torch, on the meta device: no memory); the integrator's FLOPs come
from torch's FLOP counter on its real module, so every registered integrator is covered.

Conventions: a multiply-add is 2 FLOPs; ``bytes`` are bytes moved from DRAM assuming weights are
read once per pass and activations stay in cache (true for decode, optimistic for big prefills).
"""
from __future__ import annotations

from typing import Any

# Average bits per weight, block scales included (llama.cpp's k-quant mixes: the _M types keep some
# tensors at higher precision; values as reported by llama.cpp's quantize tool for LLaMA models).
BITS_PER_WEIGHT: dict[str, float] = {
    "fp32": 32.0, "f32": 32.0, "fp16": 16.0, "f16": 16.0, "bf16": 16.0,
    "q8_0": 8.5, "int8": 8.0, "q6_k": 6.5625, "q5_k_m": 5.69, "q5_0": 5.5, "q4_k_m": 4.89, "q4_k_s": 4.58,
    "q4_0": 4.5, "int4": 5.0,  # ONNX MatMulNBits, block 32, fp32 scale per block, symmetric
    "int8_vnni": 8.0, "int4_vnni": 5.0,  # the same weights; only the int8 format differs
    "int8_reduce-range": 8.0, "int4_reduce-range": 5.0,
    "q3_k_m": 3.91, "q2_k": 3.35,
    "8da4w": 5.0,  # ExecuTorch/torchao: int4 weights, group 32, one fp32 scale per group
}


def bits_per_weight(precision: str) -> float:
    try:
        return BITS_PER_WEIGHT[precision.lower()]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r}; known: {', '.join(BITS_PER_WEIGHT)}") from None


# --- shapes ------------------------------------------------------------------------------------


def vit_params_per_layer(d: int, inter: int) -> int:
    return 4 * (d * d + d) + 2 * d * inter + inter + d + 4 * d  # q,k,v,o (+bias), fc1, fc2, 2 LayerNorms


def llm_params(llm: dict) -> dict[str, int]:
    d, inter, n_layers = llm["hidden"], llm["intermediate"], llm["layers"]
    kv_dim = llm["kv_heads"] * (d // llm["heads"])
    per_layer = 2 * d * d + 2 * d * kv_dim + 3 * d * inter + 2 * d
    head = 0 if llm.get("tie_embeddings") else llm["vocab"] * d
    return {"embed": llm["vocab"] * d, "layers": n_layers * per_layer + d, "head": head}


def model_shape(model) -> dict[str, Any]:
    """The ``shape`` dict of a loaded EdgeVLM."""
    return config_shape(model.cfg)


def preset_shape(preset: str, **overrides: Any) -> dict[str, Any]:
    """The ``shape`` of a preset (with overrides) without building its weights."""
    from edgevlm.model.config import preset_config

    return config_shape(preset_config(preset, **overrides))


def config_shape(cfg) -> dict[str, Any]:
    """The ``shape`` of a VLMConfig; the integrator is counted by torch on the meta device."""
    v, c = cfg.vision, cfg.llm
    flops, params, tokens = integrator_cost(cfg.integrator, v.hidden_size, c.hidden_size, v.grid, v.num_features,
                                            llm=c)
    sel = v.select_layer
    layers_used = sel if sel >= 0 else v.num_hidden_layers + 1 + sel  # as VisionTower runs it
    return {
        "preset": cfg.preset,
        "vision": {"hidden": v.hidden_size, "intermediate": v.intermediate_size, "layers_used": layers_used,
                   "image_size": v.image_size, "patch_size": v.patch_size, "num_patches": v.num_patches},
        "integrator": {"name": cfg.integrator.name, "params": params, "flops": flops, "n_visual_tokens": tokens},
        "llm": {"hidden": c.hidden_size, "intermediate": c.intermediate_size, "layers": c.num_hidden_layers,
                "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads, "vocab": c.vocab_size,
                "max_positions": c.max_position_embeddings, "tie_embeddings": c.tie_word_embeddings},
    }


def integrator_cost(icfg, vision_dim: int, llm_dim: int, grid: int, n_features: int,
                    llm=None) -> tuple[int, int, int]:
    """(FLOPs per image, parameters, visual tokens) of an integrator, counted by torch on the meta device.

    Integrators acting inside the LLM (``placement`` weights / in_block) need the LLM config ``llm``;
    their per-image weights (vlora's generators, gated_prefix's projection) count as per-image FLOPs.
    What they add per LLM token is not included here (vlora: ``integrator.cost()``)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from edgevlm.model.integrators import build_integrator, count_parameters

    with torch.device("meta"):
        module = build_integrator(icfg, vision_dim, llm_dim, grid, llm=llm)
        x = torch.empty(1, n_features, vision_dim)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(x)
        if hasattr(module, "image_weights"):
            module.image_weights(x)
    return int(counter.get_total_flops()), int(count_parameters(module)), int(module.num_tokens(n_features))


# --- stage costs -------------------------------------------------------------------------------


def vision_cost(vision: dict, n_images: int = 1) -> dict[str, float]:
    """CLIP ViT: patch embedding + the blocks that feed the selected layer, CLS included."""
    d, inter, p = vision["hidden"], vision["intermediate"], vision["patch_size"]
    n_patch = vision["num_patches"]
    n = n_patch + 1  # CLS
    per_layer = 2 * n * (4 * d * d + 2 * d * inter) + 4 * n * n * d  # projections + MLP + QK^T/AV
    flops = n_images * (2 * n_patch * 3 * p * p * d + vision["layers_used"] * per_layer)
    params = (3 * p * p * d + (n_patch + 1) * d + d + 2 * d  # patch conv, positions, CLS, pre-LayerNorm
              + vision["layers_used"] * vit_params_per_layer(d, inter))
    return {"flops": flops, "params": params}


def llm_token_flops(llm: dict, context: float) -> float:
    """FLOPs to run one new token against ``context`` cached positions (lm head included)."""
    p = llm_params(llm)
    return 2 * (p["layers"] + (p["head"] or p["embed"])) + 4 * llm["layers"] * llm["hidden"] * context


def kv_bytes(llm: dict, positions: float, kv_bits: float = 16) -> float:
    kv_dim = llm["kv_heads"] * (llm["hidden"] // llm["heads"])
    return 2 * llm["layers"] * kv_dim * positions * kv_bits / 8


def stage_costs(shape: dict, weights: str, vision_precision: str | None = None, kv_bits: float = 16,
                n_images: int = 1, n_text: int = 32, n_new: int = 32,
                decode_weight_bytes: float | None = None) -> dict[str, Any]:
    """FLOPs and DRAM bytes per stage for one request.

    ``weights``: LLM precision (``q4_k_m``, ``fp32``...); ``vision_precision``: tower + integrator
    (default: f16 for GGUF-style quants, else the LLM's); ``decode_weight_bytes``: the real bytes
    of the LLM weights a decode step reads (from the artifact) instead of the bits-per-weight
    estimate.
    """
    llm = shape["llm"]
    vp = vision_precision or ("f16" if weights.lower().startswith("q") else weights)
    vbytes = bits_per_weight(vp) / 8
    vis = vision_cost(shape["vision"], n_images)
    integ = shape["integrator"]
    n_vis = n_images * integ["n_visual_tokens"]
    t_prompt = n_vis + n_text
    p = llm_params(llm)
    read_params = p["layers"] + (p["head"] or p["embed"])  # the embedding table is only gathered
    w_bytes = decode_weight_bytes or read_params * bits_per_weight(weights) / 8
    mean_ctx = t_prompt + (n_new - 1) / 2
    prefill_flops = (2 * t_prompt * p["layers"] + 2 * llm["layers"] * llm["hidden"] * t_prompt * t_prompt
                     + 2 * (p["head"] or p["embed"]))  # causal attention: half of 4*T^2*D; head on 1 token
    return {
        "n_visual_tokens": n_vis, "n_prompt_tokens": t_prompt, "n_new_tokens": n_new,
        "precision": {"llm": weights, "vision": vp, "kv_bits": kv_bits},
        "vision": {"flops": vis["flops"], "bytes": vis["params"] * vbytes, "params": vis["params"]},
        "integrator": {"flops": n_images * integ["flops"], "bytes": integ["params"] * vbytes,
                       "params": integ["params"]},
        "prefill": {"flops": prefill_flops, "bytes": w_bytes + kv_bytes(llm, t_prompt, kv_bits),
                    "tokens": t_prompt},
        "decode": {"flops_per_token": llm_token_flops(llm, mean_ctx),
                   "bytes_per_token": w_bytes + kv_bytes(llm, mean_ctx, kv_bits),
                   "weight_bytes_per_token": w_bytes, "mean_context": mean_ctx},
        "kv_cache_bytes": kv_bytes(llm, t_prompt + n_new, kv_bits),
        "kv_cache_bytes_full_context": kv_bytes(llm, llm["max_positions"], kv_bits),
        "weights_bytes": (vis["params"] + integ["params"]) * vbytes
        + (p["layers"] + p["head"] + p["embed"]) * bits_per_weight(weights) / 8,
    }
