"""ONNX export: the three graphs (names, dynamic axes, checker, validation against PyTorch), every
registered integrator, fp16/int8/int4/.ort variants, large-graph external data, the manifest, the
CLI, and that a failed export leaves no bundle. Real ONNX Runtime throughout."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from edgevlm import load_model  # noqa: E402
from edgevlm.export import onnx_graphs, onnx_io, onnx_quant, onnx_quant_check  # noqa: E402
from edgevlm.export.onnx_validate import TOLERANCES, validate_graph  # noqa: E402
from edgevlm.export.to_onnx import export_fp32_graphs, export_onnx  # noqa: E402
from edgevlm.runtime.graph_io import INPUT_IDS, PIXEL_VALUES  # noqa: E402
from edgevlm.runtime.chat import get_template  # noqa: E402
from edgevlm.runtime.manifest import read_manifest  # noqa: E402
from edgevlm.runtime.target_info import Int4Info, OnnxInfo  # noqa: E402
from edgevlm.runtime.errors import EdgeVLMError  # noqa: E402
from edgevlm.model.integrators import INTEGRATORS, export_refusal  # noqa: E402

from conftest import SMALL  # noqa: E402

GRAPH_FILES = {"vision_encoder": "vision_encoder.onnx", "embed_tokens": "embed_tokens.onnx",
               "decoder": "decoder_model_merged.onnx"}


@pytest.fixture(scope="module")
def fp32_graphs(tiny_model, tmp_path_factory):
    return export_fp32_graphs(tiny_model, tmp_path_factory.mktemp("onnx_fp32"))


@pytest.fixture(scope="module")
def bundles(tiny_model, fp32_graphs, tmp_path_factory, shapes_dir):
    """fp32, fp16, int8 and int4 (+ .ort) bundles sharing one fp32 export."""
    root = tmp_path_factory.mktemp("onnx_bundles")
    variants = {"fp32": ("fp32", "none", False), "fp16": ("fp16", "none", False),
                "int8": ("fp32", "int8", False), "int4": ("fp32", "int4", True)}
    return {name: export_onnx(tiny_model, root / name, dt, q, ort_format=ortf, calib_data=str(shapes_dir),
                              calib_count=8, fp32_graphs=fp32_graphs, progress=False)
            for name, (dt, q, ortf) in variants.items()}


def _io(path):
    g = onnx.load(str(path), load_external_data=False).graph
    return [i.name for i in g.input], [o.name for o in g.output]


def _ops(path):
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_graph_io_names_follow_genai_and_optimum(tiny_model, bundles):
    n = tiny_model.cfg.llm.num_hidden_layers
    root = bundles["fp32"]
    assert _io(root / GRAPH_FILES["vision_encoder"]) == (["pixel_values"], ["image_features"])
    assert _io(root / GRAPH_FILES["embed_tokens"]) == (["input_ids"], ["inputs_embeds"])
    ins, outs = _io(root / GRAPH_FILES["decoder"])
    kinds = [f"{i}.{k}" for i in range(n) for k in ("key", "value")]
    assert ins == ["inputs_embeds", "attention_mask", "position_ids", *(f"past_key_values.{s}" for s in kinds)]
    assert outs == ["logits", *(f"present.{s}" for s in kinds)]
    for f in GRAPH_FILES.values():
        onnx.checker.check_model(str(root / f))
        assert onnx.load(str(root / f)).opset_import[0].version >= 17


def test_axes_are_dynamic(tiny_model, bundles):
    g = onnx.load(str(bundles["fp32"] / GRAPH_FILES["decoder"]), load_external_data=False).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.input}
    c = tiny_model.cfg.llm
    assert dims["inputs_embeds"] == ["batch", "sequence_length", c.hidden_size]
    assert dims["attention_mask"] == ["batch", "total_sequence_length"]
    assert dims["past_key_values.0.key"] == ["batch", c.num_key_value_heads, "past_sequence_length",
                                             c.hidden_size // c.num_attention_heads]
    vis = onnx.load(str(bundles["fp32"] / GRAPH_FILES["vision_encoder"]), load_external_data=False).graph
    assert vis.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_fp32_validation_recorded_and_tight(bundles):
    info = read_manifest(bundles["fp32"]).target_info
    for graph, g in info.graphs.items():
        v = g.validation
        atol, rtol = TOLERANCES["fp32"][graph]["atol"], TOLERANCES["fp32"][graph]["rtol"]
        print(f"{graph}: max |ort - torch| = {v['max_abs_diff']:.3g} (scale {v['ref_scale']:.3g})")
        assert v["max_abs_diff"] <= atol + rtol * v["ref_scale"]
        assert v["max_abs_diff"] < 1e-4
    assert set(info.graphs["decoder"].validation["cases"]) == {"prefill", "decode", "batch2_chunk"}


def test_manifest_describes_the_bundle(tiny_model, bundles):
    root = bundles["int4"]
    m = read_manifest(root)  # sizes and sha256 verified
    roles = {f.role: f.path for f in m.files}
    assert roles["vision_encoder"] == "vision_encoder.onnx" and roles["decoder"] == "decoder_model_merged.onnx"
    assert roles["tokenizer"] == "tokenizer.json"
    assert {"vision_encoder_ort", "embed_tokens_ort", "decoder_ort", "ort_config"} <= set(roles)
    assert all(len(f.sha256) == 64 and f.size > 0 for f in m.files)
    assert m.model.integrator == tiny_model.cfg.integrator.name
    assert m.model.n_visual_tokens == tiny_model.n_visual_tokens
    assert m.preprocess == tiny_model.cfg.preprocess and m.chat_template.name == tiny_model.cfg.chat_template
    assert m.chat_template == get_template(tiny_model.cfg.chat_template)  # the pieces, not only the name
    assert m.tokens == tiny_model.cfg.tokens
    info = m.target_info
    assert isinstance(info, OnnxInfo) and info.trt_refusal == ""
    assert info.opset >= 17 and info.quantize == "int4" and info.exporter.startswith("torch.onnx")
    assert info.int4 == Int4Info(block_size=32, accuracy_level=4, symmetric=True, op="com.microsoft.MatMulNBits")
    assert info.calibration.n_images == 8
    assert {"onnx", "onnxruntime", "torch"} <= set(m.exporter.versions) and m.exporter.created
    assert not [p for p in root.parent.iterdir() if ".partial-" in p.name]


def test_variants_have_the_expected_operators(tiny_model, bundles):
    n_layers = tiny_model.cfg.llm.num_hidden_layers
    dec4 = onnx.load(str(bundles["int4"] / GRAPH_FILES["decoder"])).graph
    nbits = [n for n in dec4.node if n.op_type == "MatMulNBits"]
    attrs = {a.name: a.i for a in nbits[0].attribute}
    assert attrs["block_size"] == 32 and attrs["accuracy_level"] == 4 and attrs["bits"] == 4
    assert len(nbits) == 4 * n_layers + 1  # fused qkv, o, fused gate/up, down per layer + LM head
    assert sum(n.op_type == "GroupQueryAttention" for n in dec4.node) == n_layers  # quantised: gqa decoder
    assert "GroupQueryAttention" not in _ops(bundles["fp32"] / GRAPH_FILES["decoder"])  # portable graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(bundles["int8"] / GRAPH_FILES["vision_encoder"])
    assert "MatMulInteger" in _ops(bundles["int8"] / GRAPH_FILES["decoder"])
    dec16 = onnx.load(str(bundles["fp16"] / GRAPH_FILES["decoder"])).graph
    assert dec16.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert dec16.input[3].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16  # the KV cache in fp16
    for name in ("fp16", "int8", "int4"):
        info = read_manifest(bundles[name]).target_info
        for graph, g in info.graphs.items():
            v = g.validation
            print(f"{name} {graph} ({g.variant}): max |ort - torch| = {v['max_abs_diff']:.3g}, "
                  f"relative L2 {v['max_rel_l2']:.3g}")
            judged = v["kernels"] if graph == "decoder" and name != "fp16" else v  # quantised: vs its fp32 twin
            if name != "fp16" and graph != "embed_tokens":
                assert judged["max_rel_l2_all_outputs"] <= TOLERANCES[name][graph]["rel_l2"]


def test_kv_cache_mode_is_recorded(bundles):
    for name, in_place in (("fp32", False), ("fp16", False), ("int8", True), ("int4", True)):
        info = read_manifest(bundles[name]).target_info
        assert info.kv_cache.in_place is in_place
        assert info.graphs["decoder"].attention == ("gqa" if in_place else "standard")
    cases = read_manifest(bundles["int4"]).target_info.graphs["decoder"].validation["cases"]
    assert {"prefill", "decode", "batch2_decode"} <= set(cases)


def test_gqa_decoder_matches_torch_in_fp32(tiny_model, tmp_path):
    """The GroupQueryAttention decoder is built from the weights, not traced: check it strictly."""
    info = onnx_graphs.build_gqa_decoder(tiny_model, tmp_path / "decoder_model_merged.onnx")
    report = validate_graph(tiny_model, "decoder", tmp_path / "decoder_model_merged.onnx", gqa=True)
    print(f"gqa decoder ({info['exporter']}): max |ort - torch| = {report['max_abs_diff']:.3g}")
    assert report["max_abs_diff"] < 1e-4


def test_gqa_builder_streams_large_weights_to_external_data(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_graphs, "EXTERNAL_DATA_BYTES", 1000)
    path = tmp_path / "decoder_model_merged.onnx"
    onnx_graphs.build_gqa_decoder(tiny_model, path)
    files = onnx_io.graph_files(path)
    assert [f.name for f in files] == ["decoder_model_merged.onnx", "decoder_model_merged.onnx_data"]
    assert files[0].stat().st_size < 100_000
    assert validate_graph(tiny_model, "decoder", path, gqa=True)["max_abs_diff"] < 1e-4


def test_ort_format_files_load_in_onnx_runtime(bundles):
    root = bundles["int4"]
    for f in ("vision_encoder.ort", "embed_tokens.ort", "decoder_model_merged.ort"):
        s = ort.InferenceSession(str(root / f), providers=["CPUExecutionProvider"])
        assert s.get_inputs()
    config = (root / "required_operators_and_types.config").read_text()
    assert "MatMulNBits" in config and "ai.onnx" in config


@pytest.mark.parametrize("integrator", INTEGRATORS.names())
def test_vision_graph_for_every_integrator(integrator, tmp_path):
    model = load_model("tiny", integrator=integrator, **SMALL).float().eval()
    reason = export_refusal(integrator, "onnx")
    if reason:  # refused by the exporter, with the integrator's reason, before writing anything
        with pytest.raises(EdgeVLMError, match=re.escape(f"cannot be exported to onnx: {reason}")):
            export_onnx(model, tmp_path / "b", progress=False)
        assert not any(tmp_path.iterdir())
        return
    graphs = onnx_graphs.export_graphs(model, tmp_path, graphs=("vision_encoder",))
    path = graphs["vision_encoder"]["path"]
    report = validate_graph(model, "vision_encoder", path)  # batch 1 and 3: the batch axis is dynamic
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = s.run(None, {PIXEL_VALUES: np.zeros((2, 3, 336, 336), np.float32)})[0]
    assert out.shape == (2, model.n_visual_tokens, model.cfg.llm.hidden_size)
    assert report["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("exporter", onnx_graphs.EXPORTERS)
def test_c_abstractor_non_divisible_pooling_exports(exporter, tmp_path):
    """256 tokens from a 24x24 grid (24 -> 16 is not a whole stride): adaptive pooling that the
    TorchScript exporter refuses as nn.AdaptiveAvgPool2d; as a fixed pooling matrix it exports."""
    model = load_model("tiny", integrator="c_abstractor", integrator_kwargs={"num_tokens": 256, "depth": 1},
                       **SMALL).float().eval()
    path = onnx_graphs.export_graphs(model, tmp_path, exporter, graphs=("vision_encoder",))["vision_encoder"]["path"]
    report = validate_graph(model, "vision_encoder", path)
    print(f"c_abstractor 256 ({exporter}): max |ort - torch| = {report['max_abs_diff']:.3g}")
    assert model.n_visual_tokens == 256 and report["max_abs_diff"] < 1e-4
    assert "AveragePool" not in _ops(path) and "GlobalAveragePool" not in _ops(path)


def test_torchscript_exporter_and_cli(tiny_model, tmp_path, shapes_dir, capsys):
    from edgevlm.cli import main

    out = tmp_path / "ts-int8"
    args = ["export", "onnx", "--model", "tiny", "--out", str(out), "--exporter", "torchscript",
            "--quantize", "int8", "--calib-data", str(shapes_dir / "images"), "--calib-count", "4",
            *(f"{k.replace('__', '.')}={v}" for k, v in SMALL.items())]
    assert main(args) == 0
    m = read_manifest(out)
    assert m.target_info.exporter == "torch.onnx (torchscript)"
    assert m.target_info.graphs["decoder"].validation["cases"]["prefill"]["max_abs"] < 1
    assert "wrote" in capsys.readouterr().out


def test_cli_rejects_bad_combinations(tmp_path, capsys):
    from edgevlm.cli import main

    rc = main(["export", "onnx", "--model", "tiny", "--out", str(tmp_path / "b"), "--dtype", "fp16",
               "--quantize", "int8"])
    assert rc == 2 and "cannot be combined" in capsys.readouterr().err
    rc = main(["export", "onnx", "--model", "tiny", "--out", str(tmp_path / "b"), "--dtype", "fp16",
               "--attention", "gqa"])
    assert rc == 2 and "fp32/int8/int4" in capsys.readouterr().err
    assert main(["export", "onnx", "--model", "tiny", "--out", str(tmp_path / "b"), "--opset", "13"]) == 2
    assert not (tmp_path / "b").exists()


def test_failed_export_leaves_no_bundle(tiny_model, fp32_graphs, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("killed mid-export")

    monkeypatch.setattr(onnx_quant, "quantize_int4", boom)
    with pytest.raises(RuntimeError, match="killed"):
        export_onnx(tiny_model, tmp_path / "b", quantize="int4", calib_count=2, fp32_graphs=fp32_graphs,
                    progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its staging dir


def test_large_graphs_keep_weights_in_external_data(fp32_graphs, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_BYTES", 1000)  # pretend the embedding table is large
    files = onnx_io.copy_graph(fp32_graphs["embed_tokens"]["path"], tmp_path / "embed_tokens.onnx")
    assert [f.name for f in files] == ["embed_tokens.onnx", "embed_tokens.onnx_data"]
    assert files[0].stat().st_size < 10_000 < files[1].stat().st_size
    onnx.checker.check_model(str(files[0]))
    s = ort.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(str(fp32_graphs["embed_tokens"]["path"]), providers=["CPUExecutionProvider"])
    ids = {INPUT_IDS: np.array([[1, 5, 9]], np.int64)}
    np.testing.assert_array_equal(s.run(None, ids)[0], ref.run(None, ids)[0])


def test_manifest_json_is_plain_data(bundles):
    data = json.loads((bundles["fp32"] / "manifest.json").read_text())
    assert data["format_version"] == 2 and data["target"] == "onnx"
    assert data["target_info"]["graphs"]["decoder"]["outputs"]["logits"] == ["batch", "sequence_length",
                                                                             data["model"]["vocab_size"]]


# --- int8 formats that are accurate on every CPU, and checks that fail on a damaged export ----------


def test_int8_format_is_recorded(bundles):
    for name in ("int8", "int4"):  # the int4 bundle's vision graph is int8 too
        fmt = read_manifest(bundles[name]).target_info.int8
        assert fmt.target == "portable" and fmt.weight_type == "uint8" and not fmt.reduce_range
        assert "every CPU" in fmt.accurate_on
    assert read_manifest(bundles["fp32"]).target_info.int8 is None


def test_int8_targets_of_the_cli_are_the_formats():
    from edgevlm.export.to_onnx import INT8_TARGETS

    assert set(INT8_TARGETS) == set(onnx_quant.INT8_FORMATS) and onnx_quant.DEFAULT_INT8 == INT8_TARGETS[0]


@pytest.mark.parametrize("saturates", [True, False])
def test_vnni_failure_advice_depends_on_the_host(monkeypatch, saturates):
    """A vnni int8 graph that fails validation: on a CPU without VNNI the cause is saturation, on one
    with VNNI it is the format itself; the advice says which."""
    from edgevlm.export import to_onnx
    from edgevlm.runtime import hostcpu

    monkeypatch.setattr(hostcpu, "u8s8_saturates", lambda flags=None: saturates)
    advice = to_onnx._advice("int8_dynamic", to_onnx.int8_format("vnni"))
    assert ("lacks it" in advice) is saturates and ("has VNNI" in advice) is not saturates
    assert "--int8-target portable" in advice


@pytest.mark.parametrize("target", list(onnx_quant.INT8_FORMATS))
def test_int8_targets_store_their_weight_type(fp32_graphs, tmp_path, target):
    from onnx import numpy_helper

    fmt = onnx_quant.INT8_FORMATS[target]
    onnx_quant.quantize_int8_dynamic(fp32_graphs["decoder"]["path"], tmp_path / "d.onnx", fmt)
    g = onnx.load(str(tmp_path / "d.onnx")).graph
    weights = [numpy_helper.to_array(t) for t in g.initializer if t.name.endswith("_quantized")]
    assert weights and {w.dtype.name for w in weights} == {fmt.weight_type}
    widest = max(int(np.abs(w.astype(np.int16)).max()) for w in weights)
    if fmt.reduce_range:  # |w| <= 64: 2 x 255 x 64 = 32640 keeps AVX2's 16-bit pair sums from saturating
        assert widest <= 64
    else:
        assert widest > 64


def test_validation_fails_on_a_damaged_graph(tiny_model, fp32_graphs, tmp_path):
    from conftest import perturb_onnx_weight

    path = tmp_path / "decoder_model_merged.onnx"
    onnx_io.copy_graph(fp32_graphs["decoder"]["path"], path)
    perturb_onnx_weight(path, rel=0.05)
    with pytest.raises(EdgeVLMError, match=r"differs from PyTorch.*CPU"):
        validate_graph(tiny_model, "decoder", path, "fp32")
    perturb_onnx_weight(path, rel=2.0)  # an int8 decoder of damaged weights: the format bound vs PyTorch
    onnx_quant.quantize_int8_dynamic(path, tmp_path / "int8.onnx")
    with pytest.raises(EdgeVLMError, match=r"differs from PyTorch by a relative L2 .* > 0\.25.*--quantize int4"):
        onnx_quant_check.validate_quantized_decoder(tiny_model, tmp_path / "int8.onnx", path, "int8", gqa=False)


def test_token_check_is_recorded_and_fails_on_a_damaged_bundle(tiny_model, bundles, tmp_path):
    from conftest import copy_bundle, perturb_onnx_weight

    from edgevlm.export.token_check import check_tokens

    for name in ("fp32", "int8"):
        tc = read_manifest(bundles[name]).target_info.token_check
        print(f"{name}: {tc}")
        assert tc.n_sequences == 4 and tc.n_positions == 4 * tc.steps
        assert tc.logit_atol == (1e-3 if name == "fp32" else None)
    assert read_manifest(bundles["fp32"]).target_info.token_check.max_abs_logit_diff < 1e-3
    b = copy_bundle(bundles["fp32"], tmp_path)
    perturb_onnx_weight(b / "decoder_model_merged.onnx", rel=0.05)
    with pytest.raises(EdgeVLMError, match="token check: held-out prompt 0: logits differ"):
        check_tokens(tiny_model, b, read_manifest(b, verify=False), 2, atol=1e-3, threads=1)


def _damage_quantised_weight(path: Path, dst: Path) -> None:
    """The first quantised weight of ``path`` written wrong into ``dst``: int4 nibbles swapped,
    int8 rows (K) reversed, as a packing or transpose bug would."""
    proto = onnx.load(str(path))
    t = next(t for t in proto.graph.initializer if t.name.endswith(("_Q4", "_quantized")))
    w = onnx.numpy_helper.to_array(t)
    w = ((w & 0x0F) << 4) | (w >> 4) if t.name.endswith("_Q4") else w[::-1]
    t.CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(w), t.name))
    onnx.save_model(proto, str(dst))


@pytest.mark.parametrize("variant", ["int4", "int8"])
def test_quantised_decoder_is_judged_by_kernels_and_weights(tiny_model, bundles, tmp_path, variant):
    """vs fp32 is mostly the format's error; vs the fp32 twin the kernels' (judged); the weights vs
    their source (judged). A damaged twin or damaged quantised weights fail the export."""
    from conftest import perturb_onnx_weight

    v = read_manifest(bundles[variant]).target_info.graphs["decoder"].validation
    print(f"{variant} decoder vs fp32 {v['max_rel_l2_all_outputs']:.3g} (twin vs fp32 "
          f"{v['dequantized_vs_fp32_rel_l2']:.3g}), vs its twin "
          f"{v['kernels']['max_rel_l2_all_outputs']:.3g}, weights {v['weights']}")
    assert v["kernels"]["max_rel_l2_all_outputs"] < v["dequantized_vs_fp32_rel_l2"]  # the format dominates
    assert 0 < v["weights"]["max"] <= onnx_quant_check.WEIGHT_REL_ERROR[variant]
    bound = onnx_quant_check.FORMAT_REL_L2.get(variant)
    assert v["tolerance"] == ({"rel_l2": bound} if bound else "reported only")
    if variant == "int8":  # the twin is the format's integer arithmetic in float: exact but for rounding
        assert v["kernels"]["max_rel_l2_all_outputs"] < 1e-3
    graph = bundles[variant] / GRAPH_FILES["decoder"]
    twin = tmp_path / "twin.onnx"
    onnx_quant_check.TWINS[variant](graph, twin)
    perturb_onnx_weight(twin, rel=0.25)
    with pytest.raises(EdgeVLMError, match="relative L2 error"):
        validate_graph(tiny_model, "decoder", graph, variant, gqa=True, reference=twin)
    _damage_quantised_weight(graph, tmp_path / "damaged.onnx")
    onnx_graphs.build_gqa_decoder(tiny_model, tmp_path / "fp32.onnx")  # the fp32 source is not in the bundle
    with pytest.raises(EdgeVLMError, match=f"{variant} weights are wrong"):
        onnx_quant_check.validate_quantized_decoder(tiny_model, tmp_path / "damaged.onnx", tmp_path / "fp32.onnx",
                                                    variant, gqa=True)
