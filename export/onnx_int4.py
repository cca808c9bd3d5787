"""Checks for int4 (MatMulNBits) graphs that tell the weight format's error from the kernels'.

int4 weights are coarse: on random-weight models the logits of a correct int4 decoder differ from
fp32 by a relative L2 of 0.19 (tiny preset) to about 0.5 (mobilevlm-1.7b shape), and so does the
same graph computed in fp32 with the dequantised weights (the twin below). A bound on "int4 vs
fp32" therefore says little about the export. Two checks do:

* ``weight_errors``: every int4 matrix, dequantised, against the fp32 weight it came from
  (relative Frobenius error per matrix): catches wrong packing, scales or transposes.
* ``dequantized_twin``: the same graph with each MatMulNBits replaced by a plain MatMul on its
  dequantised weight. ONNX Runtime's int4 graph against this twin isolates what the kernels add
  (activation quantisation at accuracy level 4, int8 dot products on this CPU).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgevlm.runtime.errors import EdgeVLMError


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def dequantize(node, inits: dict) -> np.ndarray:
    """The [K, N] fp32 weight a symmetric 4-bit MatMulNBits node multiplies by."""
    from onnx import numpy_helper

    a = _attrs(node)
    if a.get("bits", 4) != 4 or (len(node.input) > 3 and any(node.input[3:])):
        raise EdgeVLMError(f"{node.name}: only symmetric 4-bit MatMulNBits without zero points or bias is handled")
    k, n, block = a["K"], a["N"], a["block_size"]
    packed = numpy_helper.to_array(inits[node.input[1]])  # uint8 [N, n_blocks, block / 2]
    scales = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32).reshape(n, -1)  # [N, n_blocks]
    q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, scales.shape[1], block)  # low nibble first
    w = (q.astype(np.float32) - 8.0) * scales[..., None]  # [N, n_blocks, block]; zero point 8
    return np.ascontiguousarray(w.reshape(n, -1)[:, :k].T)  # [K, N]


def _nbits_nodes(proto) -> list:
    return [n for n in proto.graph.node if n.op_type == "MatMulNBits"]


def weight_errors(int4_path: str | Path, fp32_path: str | Path) -> dict:
    """Relative error of each dequantised int4 weight vs its fp32 source (matched by the
    quantiser's ``<name>_Q4`` naming). Returns {"max", "mean", "n_matrices", "worst"}."""
    import onnx
    from onnx import numpy_helper

    q = onnx.load(str(int4_path))
    inits = {t.name: t for t in q.graph.initializer}
    source = {t.name: t for t in onnx.load(str(fp32_path)).graph.initializer}
    errors = {}
    for node in _nbits_nodes(q):
        name = node.input[1].removesuffix("_Q4")
        if name not in source:
            raise EdgeVLMError(f"{Path(int4_path).name}: no fp32 weight {name!r} for {node.name}")
        ref = numpy_helper.to_array(source[name]).astype(np.float32)  # [K, N]
        errors[name] = float(np.linalg.norm(dequantize(node, inits) - ref) / max(np.linalg.norm(ref), 1e-12))
    if not errors:
        raise EdgeVLMError(f"{Path(int4_path).name}: no MatMulNBits nodes")
    worst = max(errors, key=errors.get)
    return {"max": errors[worst], "mean": float(np.mean(list(errors.values()))), "n_matrices": len(errors),
            "worst": worst}


def dequantized_twin(src: str | Path, dst: str | Path) -> list[Path]:
    """Write ``src`` with every MatMulNBits replaced by MatMul on its dequantised fp32 weight."""
    import onnx
    from onnx import helper, numpy_helper

    from .onnx_io import save_model

    proto = onnx.load(str(src))
    inits = {t.name: t for t in proto.graph.initializer}
    nodes, unused = [], set()
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits":
            nodes.append(node)
            continue
        weight = f"{node.input[1]}_dequantized"
        proto.graph.initializer.append(numpy_helper.from_array(dequantize(node, inits), weight))
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], list(node.output), name=f"{node.name or node.output[0]}_fp32"))
        unused.update(node.input[1:3])
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    kept = [t for t in proto.graph.initializer if t.name not in unused]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    return save_model(proto, dst)


WEIGHT_REL_ERROR = 0.25  # per matrix; round-to-nearest block-32 int4 of Gaussian weights gives ~0.086


def validate_int4_decoder(model, path: Path, source: Path, gqa: bool, advice: str = "") -> dict:
    """The int4 decoder's numbers: vs PyTorch fp32 (reported), its dequantised twin vs PyTorch fp32
    (the weight format's share, reported), vs its twin (the kernels' share, judged by
    ``TOLERANCES['int4']['decoder']``) and the weights vs their fp32 source (judged by ``WEIGHT_REL_ERROR``)."""
    import tempfile

    from .onnx_validate import validate_graph

    weights = weight_errors(path, source)
    if weights["max"] > WEIGHT_REL_ERROR:
        raise EdgeVLMError(f"{path.name} (int4): weight {weights['worst']} differs from its fp32 source by "
                           f"{weights['max']:.3g} (relative) > {WEIGHT_REL_ERROR}: the int4 weights are wrong")
    report = validate_graph(model, "decoder", path, "int4", gqa=gqa, judge=False)
    with tempfile.TemporaryDirectory(prefix="edgevlm-int4-twin-", dir=path.parent.parent) as tmp:
        twin = Path(tmp) / "decoder_dequantized.onnx"
        dequantized_twin(path, twin)
        report["kernels"] = validate_graph(model, "decoder", path, "int4", gqa=gqa, advice=advice, reference=twin)
        twin_vs_fp32 = validate_graph(model, "decoder", twin, "int4", gqa=gqa, judge=False)  # the format alone
        report["dequantized_vs_fp32_rel_l2"] = twin_vs_fp32["max_rel_l2_all_outputs"]
    report["weights"] = weights
    return report
