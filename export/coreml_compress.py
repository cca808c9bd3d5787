"""Weight compression for the Core ML packages, with coremltools' post-training APIs
(``coremltools.optimize.coreml``), and the spec inspection that shows what a package holds.

    fp16   weights as converted (ct.precision.FLOAT16)
    int8   ``linear_quantize_weights``: symmetric int8, one scale per output channel
    int4   ``linear_quantize_weights``: symmetric int4, one scale per block of 32 input channels

Only weights feeding ``linear`` / ``conv`` / ``matmul`` ops are quantized: other large constants
(RoPE tables, position embeddings) keep fp16, since a table with an all-zero row (sin at position 0)
quantizes to NaN. Where a weight's input width is not a multiple of 32 the int4 block shrinks to
the largest of 16 / 8 that divides it (e.g. an MLP width of 688 -> 16), and a weight no
block fits stays fp16; all of it is recorded. For iOS 18 targets coremltools writes both modes as
``constexpr_blockwise_shift_scale`` ops (data int8 / int4, fp16 scales) that Core ML expands at load.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

WEIGHT_MODES = ("fp16", "int8", "int4")
INT4_BLOCK_SIZES = (32, 16, 8)  # preferred first
WEIGHT_THRESHOLD = 2048  # elements; smaller weights (norms, biases) stay fp16
QUANTIZED_OPS = ("linear", "conv", "matmul")
CONSTEXPR_OPS = ("constexpr_blockwise_shift_scale", "constexpr_affine_dequantize", "constexpr_lut_to_dense",
                 "constexpr_sparse_to_dense")


def package_modes(weights: str) -> dict[str, str]:
    """Per package: ``int4`` keeps the vision encoder at int8 (4-bit vision features lose detail the
    LLM then cannot recover; the ONNX and GGUF bundles do the same)."""
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {WEIGHT_MODES}, got {weights!r}")
    return {"vision_encoder": "int8" if weights == "int4" else weights, "decoder": weights}


def _int4_block(in_dim: int) -> int | None:
    return next((b for b in INT4_BLOCK_SIZES if in_dim % b == 0), None)


def _weight_configs(mlmodel, mode: str) -> tuple[dict[str, Any], dict[str, str]]:
    """const op name -> OpLinearQuantizerConfig, and the names left fp16 with the reason."""
    import coremltools.optimize as cto

    configs, kept = {}, {}
    for name, meta in cto.coreml.get_weights_metadata(mlmodel, weight_threshold=WEIGHT_THRESHOLD).items():
        users = {c.op_type for c in meta.child_ops}
        if not users or not users <= set(QUANTIZED_OPS):
            kept[name] = f"not a layer weight (used by {', '.join(sorted(users)) or 'nothing'})"
            continue
        shape = meta.val.shape
        if mode == "int8":
            configs[name] = cto.coreml.OpLinearQuantizerConfig(
                mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=WEIGHT_THRESHOLD)
            continue
        block = _int4_block(shape[1]) if len(shape) >= 2 else None  # [out, in, ...]: blocks along the input axis
        if block is None:
            kept[name] = f"input width {shape[1] if len(shape) >= 2 else '?'} fits no int4 block {INT4_BLOCK_SIZES}"
            continue
        configs[name] = cto.coreml.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=block,
            weight_threshold=WEIGHT_THRESHOLD)
    return configs, kept


def compress(mlmodel, mode: str) -> tuple[Any, dict]:
    """Return (compressed model, manifest facts). fp16 returns the model unchanged."""
    if mode not in WEIGHT_MODES:
        raise ValueError(f"mode must be one of {WEIGHT_MODES}, got {mode!r}")
    if mode == "fp16":
        return mlmodel, {"mode": "fp16", "method": "ct.convert compute_precision=FLOAT16"}
    import coremltools.optimize as cto

    configs, kept = _weight_configs(mlmodel, mode)
    config = cto.coreml.OptimizationConfig(global_config=None, op_name_configs=configs)
    compressed = cto.coreml.linear_quantize_weights(mlmodel, config=config)
    info: dict[str, Any] = {
        "mode": mode, "method": "coremltools.optimize.coreml.linear_quantize_weights",
        "quantizer": {"mode": "linear_symmetric", "dtype": mode,
                      "granularity": "per_channel" if mode == "int8" else "per_block",
                      "weight_threshold": WEIGHT_THRESHOLD, "op_types": list(QUANTIZED_OPS)},
        "quantized_weights": len(configs), "kept_fp16": kept,
    }
    if mode == "int4":
        blocks = Counter(c.block_size[-1] if isinstance(c.block_size, (list, tuple)) else c.block_size
                         for c in configs.values())
        info["quantizer"]["block_size"] = INT4_BLOCK_SIZES[0]
        info["quantizer"]["block_sizes_used"] = {str(b): n for b, n in sorted(blocks.items(), reverse=True)}
    info["weight_ops"] = weight_op_summary(compressed.get_spec())
    return compressed, info


# ---- spec inspection (works without Core ML's runtime) -----------------------------------------


def main_operations(spec) -> list:
    f = spec.mlProgram.functions["main"]
    return list(f.block_specializations[f.opset].operations)


def op_counts(spec) -> Counter:
    return Counter(op.type for op in main_operations(spec))


def weight_op_summary(spec) -> dict[str, Any]:
    """Compressed-weight ops by type and the dtypes of their stored data, e.g.
    ``{"constexpr_blockwise_shift_scale": {"count": 15, "data": {"INT4": 15}}}``."""
    from coremltools.proto import MIL_pb2

    out: dict[str, Any] = {}
    for op in main_operations(spec):
        if op.type not in CONSTEXPR_OPS:
            continue
        entry = out.setdefault(op.type, {"count": 0, "data": {}})
        entry["count"] += 1
        key = "data" if "data" in op.inputs else ("quantized_data" if "quantized_data" in op.inputs else None)
        if key is not None:
            dtype = MIL_pb2.DataType.Name(op.inputs[key].arguments[0].value.type.tensorType.dataType)
            entry["data"][dtype] = entry["data"].get(dtype, 0) + 1
    return out


def dequantized_weights(mlmodel) -> dict[str, Any]:
    """The weights a compressed package computes with, as numpy arrays keyed by const op name
    (``layers_0_mlp_down_proj_weight_to_fp16``): lets PyTorch measure what compression costs
    where Core ML cannot run."""
    import coremltools.optimize as cto

    plain = cto.coreml.decompress_weights(mlmodel)
    metadata = cto.coreml.get_weights_metadata(plain, weight_threshold=WEIGHT_THRESHOLD)
    return {name: meta.val for name, meta in metadata.items()}


def dequantized_state_dict(mlmodel, module) -> dict[str, Any]:
    """``dequantized_weights`` mapped onto ``module``'s parameter names (coremltools names a weight
    const after its attribute path: ``layers.0.mlp.down_proj.weight`` -> ``layers_0_mlp_down_proj_weight``),
    as tensors to ``load_state_dict(..., strict=False)``."""
    import torch

    by_const = {}
    for name, value in dequantized_weights(mlmodel).items():
        base = name.removesuffix("_quantized").removesuffix("_to_fp16")
        by_const[base] = value
    out = {}
    for pname, p in module.named_parameters():
        value = by_const.get(pname.replace(".", "_"))
        if value is not None and tuple(value.shape) == tuple(p.shape):
            out[pname] = torch.from_numpy(value.astype("float32"))
    return out
