"""Core ML export (export/to_coreml.py and coreml_*.py): the stateful decoder against transformers'
LLaMA in PyTorch, real coremltools conversion of both packages at fp16 / int8 / int4, the specs
they carry (inputs, outputs, states, compressed-weight ops), reload, the manifest, the cost of
compression measured in PyTorch with the packages' own dequantized weights, unconvertible
integrators. Core ML predictions need macOS: those tests are marked ``macos`` and skipped elsewhere."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ct = pytest.importorskip("coremltools", reason="Core ML export needs coremltools (pip install 'edgevlm[export]')")

from conftest import REPO, SMALL  # noqa: E402

from edgevlm.export.coreml_compress import op_counts, weight_op_summary  # noqa: E402
from edgevlm.export.coreml_decoder import MASK_MIN, StatefulDecoder, causal_mask, rms_norm  # noqa: E402
from edgevlm.export.to_coreml import (  # noqa: E402
    EMBED_FILE, NO_PREDICT_REASON, PACKAGES, WEIGHTS, can_predict, convert_fp16, export_coreml,
    tolerances)
from edgevlm.runtime.errors import BundleError, EdgeVLMError  # noqa: E402
from edgevlm.model.integrators import INTEGRATORS  # noqa: E402

MAX_CONTEXT = 160  # >= the tiny preset's 144 image tokens + 2


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model.float().eval()


@pytest.fixture(scope="module")
def converted(model):
    return convert_fp16(model, MAX_CONTEXT)


@pytest.fixture(scope="module")
def bundles(model, converted, tmp_path_factory):
    root = tmp_path_factory.mktemp("coreml")
    return {w: export_coreml(model, root / w, w, MAX_CONTEXT, progress=False, converted=converted) for w in WEIGHTS}


def _load(bundle, role):
    return ct.models.MLModel(str(bundle / PACKAGES[role]), skip_model_load=True)


def _embeds(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.cfg.llm.vocab_size, (1, n), generator=g)
    with torch.no_grad():
        return model.llm.get_input_embeddings()(ids)  # [1, n, D]


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# --- the stateful decoder in PyTorch --------------------------------------------------------------


@pytest.mark.parametrize("chunks", [[7, 1, 1, 1], [4, 3, 1, 1, 1], [10]])
def test_stateful_decoder_equals_transformers_llama(model, chunks):
    """Prefill (whole or chunked) then one-token steps through the KV cache == one full forward."""
    x = _embeds(model, sum(chunks))
    dec = StatefulDecoder(model.llm, 32).eval()
    outs, past = [], 0
    with torch.no_grad():
        ref = model.llm(inputs_embeds=x).logits  # [1, L, V]
        for n in chunks:
            mask = torch.from_numpy(causal_mask(past, n, np.float32))
            outs.append(dec(x[:, past : past + n], mask))
            past += n
    torch.testing.assert_close(torch.cat(outs, dim=1), ref, rtol=1e-4, atol=1e-5)
    assert dec.key_cache[:, :, :, past:].abs().max() == 0  # rows after the sequence untouched


def test_stateful_decoder_cache_holds_transformers_keys(model):
    x = _embeds(model, 6)
    dec = StatefulDecoder(model.llm, 16).eval()
    with torch.no_grad():
        dec(x, torch.from_numpy(causal_mask(0, 6, np.float32)))
        hf = model.llm(inputs_embeds=x, use_cache=True).past_key_values
    for i, layer in enumerate(hf.layers):
        torch.testing.assert_close(dec.key_cache[i, :, :, :6], layer.keys, rtol=1e-4, atol=1e-5)  # post-RoPE
        torch.testing.assert_close(dec.value_cache[i, :, :, :6], layer.values, rtol=1e-4, atol=1e-5)


def test_causal_mask_layout():
    m = causal_mask(2, 3)  # [1, 1, T=3, P+T=5]
    assert m.shape == (1, 1, 3, 5) and m.dtype == np.float16
    visible = m[0, 0] == 0
    assert visible.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert np.all(m[0, 0][~visible] == np.float16(MASK_MIN))


def test_rms_norm_survives_fp16_massive_activations(model):
    """Core ML computes RMSNorm in fp16: a plain x^2 overflows above |x| = 256, ours must not."""
    norm = model.llm.model.norm
    x = torch.randn(2, 5, norm.weight.shape[0]) * 0.5
    x[0, 1, 3] = 3000.0  # a "massive activation"
    half = copy.deepcopy(norm).half()
    with torch.no_grad():
        ref = rms_norm(x, norm)
        torch.testing.assert_close(ref, norm(x), rtol=1e-5, atol=1e-6)  # == transformers' LlamaRMSNorm
        got = rms_norm(x.half(), half).float()
        naive = half.weight * (x.half() * torch.rsqrt(x.half().pow(2).mean(-1, keepdim=True) + 1e-6))
    assert naive[0, 1].abs().max() == 0  # unguarded fp16: x^2 -> inf, rsqrt -> 0, the token is wiped
    assert torch.isfinite(got).all() and _rel(got, ref) < 5e-3


# --- conversion and the package specs -------------------------------------------------------------


def _shape_range(feature):
    arr = feature.type.multiArrayType
    return [(r.lowerBound, r.upperBound) for r in arr.shapeRange.sizeRanges]


@pytest.mark.parametrize("weights", WEIGHTS)
def test_decoder_spec_inputs_outputs_states(bundles, model, weights):
    spec = _load(bundles[weights], "decoder").get_spec()
    c = model.cfg.llm
    assert spec.specificationVersion >= 9 and spec.WhichOneof("Type") == "mlProgram"  # iOS 18 ML Program
    assert spec.mlProgram.functions["main"].opset == "CoreML8"
    ins = {f.name: f for f in spec.description.input}
    assert list(ins) == ["inputs_embeds", "causal_mask"]
    assert _shape_range(ins["inputs_embeds"]) == [(1, 1), (1, MAX_CONTEXT), (c.hidden_size, c.hidden_size)]
    assert _shape_range(ins["causal_mask"]) == [(1, 1), (1, 1), (1, MAX_CONTEXT), (1, MAX_CONTEXT)]
    fp16 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16
    assert all(f.type.multiArrayType.dataType == fp16 for f in spec.description.input)
    assert [o.name for o in spec.description.output] == ["logits"]
    assert spec.description.output[0].type.multiArrayType.dataType == fp16
    head_dim = c.hidden_size // c.num_attention_heads
    cache = [c.num_hidden_layers, 1, c.num_key_value_heads, MAX_CONTEXT, head_dim]
    states = {s.name: s.type.stateType.arrayType for s in spec.description.state}
    assert set(states) == {"key_cache", "value_cache"}
    for arr in states.values():
        assert list(arr.shape) == cache and arr.dataType == fp16
    ops = op_counts(spec)
    assert ops["read_state"] and ops["write_state"] and ops["slice_update"]  # the cache update in place
    assert ops["scaled_dot_product_attention"] == c.num_hidden_layers  # iOS 18's fused attention


@pytest.mark.parametrize("weights", WEIGHTS)
def test_vision_spec(bundles, model, weights):
    spec = _load(bundles[weights], "vision_encoder").get_spec()
    s, d = model.cfg.vision.image_size, model.cfg.llm.hidden_size
    (inp,), (out,) = spec.description.input, spec.description.output
    assert inp.name == "pixel_values" and list(inp.type.multiArrayType.shape) == [1, 3, s, s]
    assert out.name == "image_features" and list(out.type.multiArrayType.shape) == [1, model.n_visual_tokens, d]
    assert not spec.description.state


@pytest.mark.parametrize("weights", WEIGHTS)
def test_compressed_weight_ops_match_the_manifest(bundles, weights):
    from edgevlm.runtime.manifest import read_manifest

    info = read_manifest(bundles[weights]).target_info
    expected = {"fp16": ("fp16", "fp16"), "int8": ("int8", "int8"), "int4": ("int8", "int4")}[weights]
    for role, mode in zip(("vision_encoder", "decoder"), expected):
        summary = weight_op_summary(_load(bundles[weights], role).get_spec())
        facts = info.compression[role]
        assert facts["mode"] == mode
        if mode == "fp16":
            assert summary == {}
            continue
        ops = summary["constexpr_blockwise_shift_scale"]  # coremltools' iOS 18 form of both modes
        assert ops["data"] == {mode.upper(): facts["quantized_weights"]} and facts["quantized_weights"] > 5
        assert facts["weight_ops"] == summary
        if role == "decoder":  # RoPE tables are not layer weights: quantizing sin's zero row gives NaN
            assert {"rope_cos_to_fp16", "rope_sin_to_fp16"} <= set(facts["kept_fp16"])


def test_int4_blocks_are_32_wide_where_the_width_allows(bundles, model):
    from edgevlm.export.coreml_compress import main_operations

    spec = _load(bundles["int4"], "decoder").get_spec()
    blocks = set()
    for op in main_operations(spec):
        if op.type == "constexpr_blockwise_shift_scale":
            data = op.inputs["data"].arguments[0].value.type.tensorType
            scale = op.inputs["scale"].arguments[0].value.type.tensorType
            in_dim, n_blocks = data.dimensions[1].constant.size, scale.dimensions[1].constant.size
            blocks.add(in_dim // n_blocks)
    assert blocks == {32}  # tiny's widths (256, 768) are multiples of 32
    info = json.loads((bundles["int4"] / "manifest.json").read_text())["target_info"]
    assert info["compression"]["decoder"]["quantizer"]["block_sizes_used"] == {"32": 15}


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_compression_cost_within_tolerance(bundles, model, weights):
    """PyTorch with the packages' dequantized weights (fp32 compute): the logits error that
    compression alone costs stays within the tolerance the macOS checks apply."""
    from edgevlm.export.coreml_compress import dequantized_state_dict
    from edgevlm.export.coreml_vision import VisionEncoder

    q = copy.deepcopy(model)
    vision, decoder = VisionEncoder(q), StatefulDecoder(q.llm, MAX_CONTEXT)
    for module, role in ((vision, "vision_encoder"), (decoder, "decoder")):
        state = dequantized_state_dict(_load(bundles[weights], role), module)
        assert len(state) >= 10
        module.load_state_dict(state, strict=False)
    px = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats, ref_feats = q.encode_images(px), model.encode_images(px)
        seq_q = torch.cat([_embeds(q, 3), feats, _embeds(q, 4, 1)], dim=1)
        seq = torch.cat([_embeds(model, 3), ref_feats, _embeds(model, 4, 1)], dim=1)
        err = _rel(q.llm(inputs_embeds=seq_q).logits, model.llm(inputs_embeds=seq).logits)
    bounds = tolerances(weights)  # vision is int8 in both modes
    assert 0 < _rel(feats, ref_feats) < bounds["image_features_rel_err"]
    assert 0 < err < bounds["logits_rel_err"]


@pytest.mark.parametrize("integrator", INTEGRATORS.names())
def test_every_integrator_converts(model, integrator, tmp_path):
    import re

    from edgevlm import load_model
    from edgevlm.export.coreml_vision import convert_vision
    from edgevlm.model.integrators import export_refusal

    m = model if model.cfg.integrator.name == integrator else load_model("tiny", integrator=integrator, **SMALL)
    reason = export_refusal(integrator, "coreml")
    if reason:  # refused by the exporter, with the integrator's reason, before writing anything
        with pytest.raises(EdgeVLMError, match=re.escape(f"cannot be exported to coreml: {reason}")):
            export_coreml(m.float().eval(), tmp_path / "b", "fp16", MAX_CONTEXT, progress=False)
        assert not any(tmp_path.iterdir())
        return
    spec = convert_vision(m.float().eval()).get_spec()
    (out,) = spec.description.output
    assert list(out.type.multiArrayType.shape) == [1, m.n_visual_tokens, m.cfg.llm.hidden_size]


# --- the bundle -----------------------------------------------------------------------------------


def test_manifest_covers_every_package_file(bundles, model):
    from edgevlm.runtime.manifest import read_manifest

    b = bundles["int4"]
    m = read_manifest(b)  # verifies size + sha256 of every listed file
    info = m.target_info
    for role, package in PACKAGES.items():
        on_disk = sorted(p.relative_to(b).as_posix() for p in (b / package).rglob("*") if p.is_file())
        assert sorted(f.path for f in m.files_with_role(role)) == on_disk and len(on_disk) >= 3
        assert info.packages[role]["path"] == package
    assert m.target == "coreml" and info.weights == "int4" and info.max_context == MAX_CONTEXT
    assert info.deployment["target"] == "iOS18" and info.embed_tokens.file == EMBED_FILE
    assert info.packages["decoder"]["states"]["key_cache"][3] == MAX_CONTEXT
    assert m.file("embed_tokens").path == EMBED_FILE and m.file("tokenizer").path == "tokenizer.json"
    if not can_predict():
        assert info.validation == {"skipped": NO_PREDICT_REASON}
    assert not list(b.parent.glob(".*partial*"))


def test_altered_package_file_is_refused(bundles, tmp_path):
    import shutil

    from edgevlm.runtime.manifest import read_manifest

    b = tmp_path / "b"
    shutil.copytree(bundles["fp16"], b)
    weight = b / "Decoder.mlpackage" / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    data = bytearray(weight.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weight.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        read_manifest(b)


def test_embedding_table_is_raw_fp16_after_the_recorded_offset(bundles, model):
    from edgevlm.runtime.manifest import read_manifest

    b = bundles["fp16"]
    info = read_manifest(b).target_info.embed_tokens
    table = np.load(b / EMBED_FILE)
    ref = model.llm.get_input_embeddings().weight.detach().numpy().astype(np.float16)
    assert table.dtype == np.float16 and list(table.shape) == info.shape and np.array_equal(table, ref)
    raw = np.frombuffer((b / EMBED_FILE).read_bytes()[info.data_offset:], dtype="<f2")  # what Swift mmaps
    assert np.array_equal(raw.reshape(table.shape), ref)


def test_packages_reload_without_core_ml(bundles):
    for b in bundles.values():
        for role in PACKAGES:
            mlmodel = _load(b, role)
            assert mlmodel.get_spec().description.input


# --- refusals -------------------------------------------------------------------------------------


class _ErfinvProjector(torch.nn.Module):
    """Test-only integrator using erfinv, an op coremltools has no conversion for."""

    def __init__(self, vision_dim: int, llm_dim: int, grid: int):
        super().__init__()
        self.proj = torch.nn.Linear(vision_dim, llm_dim)

    def num_tokens(self, n_features: int) -> int:
        return n_features

    def forward(self, x):  # [B, N, Dv] -> [B, N, D]
        return torch.erfinv(torch.tanh(self.proj(x)) * 0.5)


class _GatedProjector(_ErfinvProjector):
    """Test-only integrator whose traced ``shape // 2`` makes coremltools' ``int`` conversion fail."""

    def __init__(self, vision_dim: int, llm_dim: int, grid: int):
        super().__init__(vision_dim, 2 * llm_dim, grid)

    def forward(self, x):  # [B, N, Dv] -> [B, N, 2D] -> [B, N, D]
        h = self.proj(x)
        half = h.shape[-1] // 2
        return h[..., :half] * torch.sigmoid(h[..., half:])


@pytest.mark.parametrize("cls, expected", [
    (_ErfinvProjector, r"cannot convert op 'erfinv' \(at integrator/\d+\) used by the vision encoder "
                       r"\(integrator 'unconvertible_test'\)"),
    (_GatedProjector, r"conversion of op 'int' \(at integrator/\d+\) in the vision encoder .*x.shape\[-1\] // 2"),
])
def test_unconvertible_integrator_names_the_op(monkeypatch, tmp_path, cls, expected):
    from edgevlm import load_model

    monkeypatch.setitem(INTEGRATORS._items, "unconvertible_test", cls)  # registered for this test only
    m = load_model("tiny", integrator="unconvertible_test", **SMALL).float().eval()
    with pytest.raises(EdgeVLMError, match=expected):
        export_coreml(m, tmp_path / "b", "fp16", max_context=600, progress=False)
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".*partial*"))


def test_cli_writes_a_bundle(tmp_path):
    from edgevlm.runtime.manifest import read_manifest

    out = subprocess.run([sys.executable, "-m", "edgevlm.cli", "export", "coreml", "--model", "tiny", "--out",
                          str(tmp_path / "b"), "--weights", "int8", "--max-context", "150",
                          "vision.num_hidden_layers=1", "llm.num_hidden_layers=1"],
                         capture_output=True, text=True, cwd=str(REPO), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "wrote" in out.stdout
    info = read_manifest(tmp_path / "b").target_info
    assert info.weights == "int8" and info.max_context == 150
    assert info.packages["decoder"]["states"]["key_cache"][0] == 1  # one LLM layer


def test_cli_bad_max_context_is_one_line_error():
    out = subprocess.run([sys.executable, "export/to_coreml.py", "--model", "tiny", "--out", "unused",
                          "--max-context", "8", "llm.num_hidden_layers=1"],
                         capture_output=True, text=True, cwd=str(REPO), timeout=300)
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert "--max-context" in line and line.endswith("got 8")


# --- Core ML predictions (macOS) ------------------------------------------------------------------


@pytest.mark.macos
@pytest.mark.skipif(not can_predict(), reason=NO_PREDICT_REASON)
@pytest.mark.parametrize("weights", WEIGHTS)
def test_predictions_match_torch(bundles, model, weights):
    from edgevlm.export.to_coreml import validate_predictions

    b = bundles[weights]
    r = validate_predictions(model, b / PACKAGES["vision_encoder"], b / PACKAGES["decoder"])
    for key, bound in tolerances(weights).items():
        assert r[key] < bound, (key, r[key])
    if weights == "fp16":
        assert r["argmax_agreement"] >= 0.9

