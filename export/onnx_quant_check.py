"""Checks for quantised decoders that tell the weight format's error from the kernels'.

A quantised decoder differs from fp32 by what its format throws away and by what ONNX Runtime's
kernels add on this CPU. On random-weight models the format's share dominates and grows with size:
int4 (MatMulNBits) logits differ from fp32 by a relative L2 of 0.19 (tiny preset) to about 0.5
(mobilevlm-1.7b shape); dynamic int8 (per-channel weights, per-tensor uint8 activations) by 0.026
to 0.10. A bound on "quantised vs fp32" alone cannot tell a sound 1.7B export from a broken one.
Three checks do:

* ``weight_errors``: every quantised matrix, dequantised, against the fp32 weight it came from
  (relative Frobenius error per matrix): catches wrong packing, scales, zero points or transposes.
* a twin, the same graph computed in plain fp32 MatMuls: ``dequantized_twin`` (int4: each
  MatMulNBits on its dequantised weight) and ``integer_twin`` (int8: each MatMulInteger on its
  integer operands as floats, zero points subtracted, which is exact while the sums stay below
  2^24). The quantised graph against its twin isolates the kernels: int4's activation quantisation
  at accuracy level 4, or int8 dot products that saturate (u8 x s8 on x86 without VNNI).
* the twin against fp32 (the format's share): reported for both; for int8 also judged, loosely
  (``FORMAT_REL_L2``), so a model whose activations per-tensor int8 cannot hold is refused.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgevlm.runtime.errors import EdgeVLMError

# per matrix: round-to-nearest block-32 int4 of Gaussian weights gives ~0.086, per-channel int8 ~0.005
WEIGHT_REL_ERROR = {"int4": 0.25, "int8": 0.05}
# the quantised graph vs PyTorch fp32 (the format): measured int8 0.026 (tiny) and 0.10
# (mobilevlm-1.7b, random weights, portable and vnni alike); int4 is only reported (see above)
FORMAT_REL_L2 = {"int8": 0.25}


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _array(inits: dict, name: str) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(inits[name])


def dequantize(node, inits: dict) -> np.ndarray:
    """The [K, N] fp32 weight a symmetric 4-bit MatMulNBits node multiplies by."""
    a = _attrs(node)
    if a.get("bits", 4) != 4 or (len(node.input) > 3 and any(node.input[3:])):
        raise EdgeVLMError(f"{node.name}: only symmetric 4-bit MatMulNBits without zero points or bias is handled")
    k, n, block = a["K"], a["N"], a["block_size"]
    packed = _array(inits, node.input[1])  # uint8 [N, n_blocks, block / 2]
    scales = _array(inits, node.input[2]).astype(np.float32).reshape(n, -1)  # [N, n_blocks]
    q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, scales.shape[1], block)  # low nibble first
    w = (q.astype(np.float32) - 8.0) * scales[..., None]  # [N, n_blocks, block]; zero point 8
    return np.ascontiguousarray(w.reshape(n, -1)[:, :k].T)  # [K, N]


def _centered_int8(node, inits: dict) -> np.ndarray:
    """A MatMulInteger's [K, N] weight minus its zero point, as float (integers, exact)."""
    w = _array(inits, node.input[1]).astype(np.float32)
    zp = node.input[3] if len(node.input) > 3 else ""
    return w - (_array(inits, zp).astype(np.float32) if zp else 0.0)


def dequantize_int8(node, inits: dict) -> np.ndarray:
    """The [K, N] fp32 weight a MatMulInteger from ``quantize_dynamic`` multiplies by: its
    per-channel scale is the ``<weight>_scale`` initializer beside ``<weight>_quantized``."""
    scale = f"{_source_name(node)}_scale"
    if scale not in inits:
        raise EdgeVLMError(f"{node.name}: no weight scale {scale!r} (not a graph from onnx_quant.quantize_int8_dynamic)")
    return _centered_int8(node, inits) * _array(inits, scale).astype(np.float32)


# op type -> (its weight dequantised to [K, N] fp32, the suffix the quantiser gave the weight)
QUANTISED_MATMULS = {"MatMulNBits": (dequantize, "_Q4"), "MatMulInteger": (dequantize_int8, "_quantized")}


def _source_name(node) -> str:
    return node.input[1].removesuffix(QUANTISED_MATMULS[node.op_type][1])


def _quantised_nodes(proto) -> list:
    return [n for n in proto.graph.node if n.op_type in QUANTISED_MATMULS and n.input[1]]


def weight_errors(path: str | Path, fp32_path: str | Path) -> dict:
    """Relative error of each dequantised weight vs its fp32 source (matched by the quantisers'
    naming). Returns {"max", "mean", "n_matrices", "worst"}."""
    import onnx

    q = onnx.load(str(path))
    inits = {t.name: t for t in q.graph.initializer}
    source = {t.name: t for t in onnx.load(str(fp32_path)).graph.initializer}
    errors = {}
    for node in _quantised_nodes(q):
        if node.input[1] not in inits:
            continue  # an activation x activation MatMulInteger: no weight
        name = _source_name(node)
        if name not in source:
            raise EdgeVLMError(f"{Path(path).name}: no fp32 weight {name!r} for {node.name}")
        ref = _array(source, name).astype(np.float32)  # [K, N]
        got = QUANTISED_MATMULS[node.op_type][0](node, inits)
        errors[name] = float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12))
    if not errors:
        raise EdgeVLMError(f"{Path(path).name}: no quantised MatMul nodes")
    worst = max(errors, key=errors.get)
    return {"max": errors[worst], "mean": float(np.mean(list(errors.values()))), "n_matrices": len(errors),
            "worst": worst}


def _replace_nodes(src: str | Path, dst: str | Path, op_type: str, replace) -> list[Path]:
    """Write ``src`` with each ``op_type`` node swapped for ``replace(node, inits)`` ->
    (nodes, new initializers, initializer names no longer used)."""
    import onnx

    from .onnx_io import save_model

    proto = onnx.load(str(src))
    inits = {t.name: t for t in proto.graph.initializer}
    nodes, added, unused = [], [], set()
    for node in proto.graph.node:
        if node.op_type != op_type:
            nodes.append(node)
            continue
        new_nodes, new_inits, dropped = replace(node, inits)
        nodes += new_nodes
        added += new_inits
        unused.update(dropped)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    kept = [t for t in proto.graph.initializer if t.name not in unused] + added
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    del proto.graph.value_info[:]  # MatMulInteger's int32 outputs become float
    return save_model(proto, dst)


def dequantized_twin(src: str | Path, dst: str | Path) -> list[Path]:
    """Write ``src`` with every MatMulNBits replaced by MatMul on its dequantised fp32 weight."""
    from onnx import helper, numpy_helper

    def replace(node, inits):
        weight = f"{node.input[1]}_dequantized"
        matmul = helper.make_node("MatMul", [node.input[0], weight], list(node.output),
                                  name=f"{node.name or node.output[0]}_fp32")
        return [matmul], [numpy_helper.from_array(dequantize(node, inits), weight)], node.input[1:3]

    return _replace_nodes(src, dst, "MatMulNBits", replace)


def integer_twin(src: str | Path, dst: str | Path) -> list[Path]:
    """Write ``src`` with every weight MatMulInteger computed as a float MatMul of its integer
    operands minus their zero points: the int8 format's arithmetic without ONNX Runtime's int8 kernels."""
    from onnx import TensorProto, helper, numpy_helper

    def replace(node, inits):
        if node.input[1] not in inits:
            return [node], [], []
        a, w, a_zp = node.input[0], node.input[1], node.input[2]
        p = node.name or node.output[0]
        nodes = [helper.make_node("Cast", [a], [f"{p}_a"], to=TensorProto.FLOAT),
                 helper.make_node("Cast", [a_zp], [f"{p}_a_zp"], to=TensorProto.FLOAT),
                 helper.make_node("Sub", [f"{p}_a", f"{p}_a_zp"], [f"{p}_a_centered"]),
                 helper.make_node("MatMul", [f"{p}_a_centered", f"{w}_centered"], list(node.output), name=f"{p}_fp32")]
        weight = numpy_helper.from_array(np.ascontiguousarray(_centered_int8(node, inits)), f"{w}_centered")
        return nodes, [weight], [w]

    return _replace_nodes(src, dst, "MatMulInteger", replace)


TWINS = {"int4": dequantized_twin, "int8": integer_twin}


def validate_quantized_decoder(model, path: Path, source: Path, variant: str, gqa: bool, advice: str = "",
                               judge: bool = True) -> dict:
    """The ``variant`` (int4 | int8) decoder's numbers: vs PyTorch fp32 (reported; int8: judged by
    ``FORMAT_REL_L2``), its twin vs PyTorch fp32 (the format's share, reported), vs its twin (the
    kernels' share, judged by ``TOLERANCES[variant]['decoder']``) and the weights vs their fp32
    source (judged by ``WEIGHT_REL_ERROR``). Without ``judge`` a failed check is listed in the
    report's ``failures`` instead of raised."""
    import tempfile

    from .onnx_io import release_memory
    from .onnx_validate import validate_graph

    failures: list[str] = []
    weights = weight_errors(path, source)
    if weights["max"] > WEIGHT_REL_ERROR[variant]:
        _fail(failures, judge, f"{path.name} ({variant}): weight {weights['worst']} differs from its fp32 source by "
              f"{weights['max']:.3g} (relative) > {WEIGHT_REL_ERROR[variant]}: the {variant} weights are wrong")
    report = validate_graph(model, "decoder", path, variant, gqa=gqa, judge=False)
    report.pop("failures")  # vs PyTorch, the kernel bound does not apply (FORMAT_REL_L2 below does)
    with tempfile.TemporaryDirectory(prefix=f"edgevlm-{variant}-twin-", dir=path.parent.parent) as tmp:
        twin = Path(tmp) / "decoder_twin.onnx"
        TWINS[variant](path, twin)
        release_memory()
        report["kernels"] = validate_graph(model, "decoder", path, variant, gqa=gqa, advice=advice, reference=twin,
                                           judge=judge)
        failures += report["kernels"]["failures"]
        release_memory()
        twin_vs_fp32 = validate_graph(model, "decoder", twin, variant, gqa=gqa, judge=False)  # the format alone
        report["dequantized_vs_fp32_rel_l2"] = twin_vs_fp32["max_rel_l2_all_outputs"]
    report["weights"] = weights
    bound = FORMAT_REL_L2.get(variant)
    if bound is not None and report["max_rel_l2_all_outputs"] > bound:
        _fail(failures, judge, f"{path.name} ({variant}): differs from PyTorch by a relative L2 of "
              f"{report['max_rel_l2_all_outputs']:.3g} > {bound}, and its twin (the {variant} format "
              f"computed in fp32) by {report['dequantized_vs_fp32_rel_l2']:.3g}: the format itself loses "
              "too much on this model; try --quantize int4 (block-wise activations) or --dtype fp16")
    report["tolerance"] = {"rel_l2": bound} if bound is not None else "reported only"  # vs PyTorch fp32
    report["failures"] = failures
    return report


def _fail(failures: list[str], judge: bool, message: str) -> None:
    if judge:
        raise EdgeVLMError(message)
    failures.append(message)
