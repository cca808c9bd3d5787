"""TensorRT's supported-operator check (export/trt_ops.py) on every exported graph: the operator
list as data, what the parser cannot take (constant inputs, QDQ zero points, subgraphs), every
integrator's vision graph and the decoder/embedding graphs, ONNX Runtime-only quantised graphs
refused with a hint. No TensorRT needed; the bundle fixtures are test_trt.py's."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("torch")

from onnx import TensorProto, helper  # noqa: E402

from edgevlm.export import trt_ops, trt_plan  # noqa: E402
from edgevlm.model.integrators import INTEGRATORS  # noqa: E402
from edgevlm.runtime.errors import EdgeVLMError  # noqa: E402

from conftest import SMALL  # noqa: E402
from test_trt import _model, _vi, manifest, onnx_bundle  # noqa: E402,F401  (fixtures)

# --- the supported-operator list ------------------------------------------------------------------


def test_op_list_is_data_with_source_and_version():
    s = trt_ops.load_support()
    assert s.tensorrt == trt_plan.TRT_TARGET
    assert s.source["repository"].endswith("onnx/onnx-tensorrt") and len(s.source["commit"]) == 40
    assert not s.supported & s.unsupported
    assert {"MatMul", "Softmax", "LayerNormalization", "Conv", "Erf", "CumSum"} <= s.supported
    assert {"MatMulInteger", "DynamicQuantizeLinear", "ConvInteger"} <= s.unsupported
    assert s.opset_min <= 18 <= s.opset_max


def test_check_graph_reports_what_the_parser_cannot_take():
    x, y = _vi("x", [2, 4]), _vi("y", [2, 4])
    assert trt_ops.check_graph(_model([helper.make_node("Relu", ["x"], ["y"])], [x], [y])) == []
    cases = {
        "custom-domain": _model([helper.make_node("MatMulNBits", ["x"], ["y"], domain="com.microsoft")], [x], [y],
                                extra_opsets=[helper.make_opsetid("com.microsoft", 1)]),
        "not supported": _model([helper.make_node("MatMulInteger", ["x", "x"], ["y"])], [x], [y]),
        "not in the support list": _model([helper.make_node("FancyNewOp", ["x"], ["y"])], [x], [y]),
        "opset 21 is outside": _model([helper.make_node("Relu", ["x"], ["y"])], [x], [y], opset=21),
    }
    for needle, model in cases.items():
        problems = trt_ops.check_graph(model)
        assert any(needle in p for p in problems), (needle, problems)


def test_check_graph_constant_inputs_and_qdq_zero_points():
    x = _vi("x", [1, 4])
    shape = helper.make_node("Shape", ["x"], ["s"])
    computed = _model([shape, helper.make_node("Unsqueeze", ["x", "s"], ["y"])], [x], [_vi("y", None)])
    const = _model([helper.make_node("Unsqueeze", ["x", "axes"], ["y"])], [x], [_vi("y", None)],
                   [helper.make_tensor("axes", TensorProto.INT64, [1], [0])])
    assert any("must be a constant" in p for p in trt_ops.check_graph(computed))
    assert trt_ops.check_graph(const) == []

    def qdq(zp_type, zp):
        inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]), helper.make_tensor("z", zp_type, [], [zp])]
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
        return _model(nodes, [x], [_vi("y", [1, 4])], inits)

    assert trt_ops.check_graph(qdq(TensorProto.INT8, 0)) == []
    assert trt_ops.quantization_kind(qdq(TensorProto.INT8, 0)) == "int8"
    assert trt_ops.check_graph(qdq(TensorProto.UINT8, 0)) == [
        "2 of 2 Q/DQ nodes have zero points TensorRT cannot take (UINT8 x2); it takes FLOAT8E4M3FN/INT4/INT8 "
        "zero points equal to 0"]
    assert any("INT8 non-zero x2" in p for p in trt_ops.check_graph(qdq(TensorProto.INT8, 3)))
    assert trt_ops.quantization_kind(qdq(TensorProto.UINT8, 128)) == "uint8"
    assert trt_ops.quantization_kind(const) is None


def test_subgraphs_are_checked():
    x, y = _vi("x", [1]), _vi("y", [1])
    bad = helper.make_graph([helper.make_node("MatMulInteger", ["x", "x"], ["o"])], "then", [], [_vi("o", [1])])
    good = helper.make_graph([helper.make_node("Identity", ["x"], ["o"])], "else", [], [_vi("o", [1])])
    cond = helper.make_tensor("c", TensorProto.BOOL, [], [True])
    model = _model([helper.make_node("If", ["c"], ["y"], then_branch=bad, else_branch=good)], [x], [y], [cond])
    assert any("MatMulInteger" in p for p in trt_ops.check_graph(model))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("integrator", INTEGRATORS.names())
def test_every_integrators_vision_graph_parses_in_tensorrt(integrator, exporter, tmp_path):
    from edgevlm import load_model
    from edgevlm.export import onnx_graphs
    from edgevlm.model.integrators import export_refusal

    reason = export_refusal(integrator, "trt")
    if reason:  # no ONNX bundle to build from, or the bundle records the refusal (test below)
        assert export_refusal(integrator, "onnx"), "a TensorRT-only refusal needs its own bundle test"
        return
    model = load_model("tiny", integrator=integrator, **SMALL).float().eval()
    path = onnx_graphs.export_graphs(model, tmp_path, exporter, graphs=("vision_encoder",))["vision_encoder"]["path"]
    assert trt_ops.check_graph(path) == [], trt_ops.check_graph(path)
    print(integrator, exporter, sorted(op for _, op in trt_ops.op_types(path)))


def test_decoder_and_embedding_graphs_parse_in_tensorrt(onnx_bundle, manifest, tiny_model, tmp_path):
    from edgevlm.export import onnx_graphs, onnx_quant

    report = trt_ops.check_bundle(onnx_bundle, manifest)
    assert report == {"vision_encoder": [], "embed_tokens": [], "decoder": []}
    ts = onnx_graphs.export_graphs(tiny_model, tmp_path / "ts", "torchscript", graphs=("embed_tokens", "decoder"))
    assert all(trt_ops.check_graph(g["path"]) == [] for g in ts.values())
    fp16 = onnx_quant.to_fp16(onnx_bundle / "decoder_model_merged.onnx", tmp_path / "dec16.onnx")[0]
    assert trt_ops.check_graph(fp16) == []  # --dtype fp16 bundles build too


def test_onnx_runtime_quantised_graphs_are_refused_with_a_hint(onnx_bundle, tmp_path):
    from edgevlm.export import onnx_quant

    int4 = onnx_quant.quantize_int4(onnx_bundle / "decoder_model_merged.onnx", tmp_path / "d4.onnx")[0]
    problems = trt_ops.check_graph(int4)
    assert any("com.microsoft.MatMulNBits" in p for p in problems)
    with pytest.raises(EdgeVLMError, match="made for ONNX Runtime"):
        trt_ops.require_supported({"decoder": problems})
    pixels = [np.random.default_rng(i).standard_normal((1, 3, 336, 336), np.float32) for i in range(2)]
    int8 = onnx_quant.quantize_int8_static(onnx_bundle / "vision_encoder.onnx", tmp_path / "v8.onnx", pixels)[0]
    assert trt_ops.quantization_kind(int8) == "uint8"  # ONNX Runtime's static int8: uint8 activations
    assert any("zero points TensorRT cannot take" in p for p in trt_ops.check_graph(int8))
