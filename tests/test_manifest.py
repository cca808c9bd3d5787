"""The typed bundle contract: every target's manifest written and read back as its dataclasses, old
and malformed manifests refused with a BundleError that says what to do, the chat template stored as
its pieces, one tokenizer file list, and real tiny ONNX and GGUF exports read back typed and run."""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest

from edgevlm.runtime.chat import TEMPLATES, ChatTemplate, get_template
from edgevlm.runtime.configio import to_dict
from edgevlm.runtime.errors import BundleError, EdgeVLMError
from edgevlm.runtime.manifest import (
    FORMAT_VERSION, MANIFEST, BundleWriter, ExporterInfo, FileEntry, Manifest, ModelSummary, read_manifest,
)
from edgevlm.runtime.preprocess_config import PreprocessConfig
from edgevlm.runtime.target_info import (
    BUNDLE_TARGETS, TARGET_INFO, Calibration, CoremlEmbeddings, CoremlInfo, ExecutorchInfo, GgufInfo, Int4Info, Int8Info,
    KvCache, LlamaCppUsage, OnnxGraph, OnnxInfo, OrtFormat, TokenCheck, TrtDevice, TrtInfo,
)
from edgevlm.runtime.tokenizer import TOKENIZER_FILES, TokenConfig

TOKEN_CHECK = TokenCheck(n_sequences=2, n_positions=16, kl_mean=0.01, kl_median=0.0, kl_p99=0.1, same_top_token=1.0,
                         rms_dp=0.001, max_abs_logit_diff=0.02, same_greedy_answer="2/2", vision_cosine_min=0.99,
                         vision_cosine_mean=0.995, steps=8, prompts="ShapesVQA test draw, seed 4321")
ONNX = OnnxInfo(
    opset=18, dtype="fp32", quantize="int4", exporter="torch.onnx (dynamo)", decoder_exporter="edgevlm GQA builder",
    graphs={"decoder": OnnxGraph("decoder_model_merged.onnx", {"inputs_embeds": ["batch", "sequence_length", 256]},
                                 {"logits": ["batch", "sequence_length", 1024]}, "int4",
                                 {"max_abs_diff": 0.01, "cases": {"prefill": {"max_abs": 0.01}}}, "gqa")},
    kv_cache=KvCache(["batch", "num_kv_heads", "sequence", "head_dim"], 2, True, "float32"),
    int8=Int8Info("portable", "uint8", "uint8", False, True, False, "QDQ", "operator", "every CPU", "note"),
    int4=Int4Info(32, 4, True, "com.microsoft.MatMulNBits"), calibration=Calibration("ShapesVQA", 8, "MinMax", 2),
    ort_format=OrtFormat("arm", "Fixed", "required_operators.config"), trt_refusal="", source="/runs/tiny",
    export_s=1.5, token_check=TOKEN_CHECK)
GGUF = GgufInfo(
    quant_types=["q4_k_m", "f16"], default_quant="q4_k_m", llm={"q4_k_m": "llm-q4_k_m.gguf", "f16": "llm-f16.gguf"},
    mmproj="mmproj-f16.gguf", mmproj_type="f16", projector_type="ldpv2", vision_layers=3, cls="omit",
    mmproj_tensors=40, mm_embd=256, llm_tensors=21, tensor_types={"f16": {"F16": 14, "F32": 7}},
    llama_cpp={"llama_cpp_python": "0.3", "llama_cpp": "b1"},
    llama_cpp_usage=LlamaCppUsage("llama-mtmd-cli -m x", "llama-server -m x", "{}"), source="tiny",
    token_check={"f16": TOKEN_CHECK})
TRT = TrtInfo(tensorrt="10.3.0", device=TrtDevice("Orin", "8.7"), precision="fp16", source_bundle="/b/onnx",
              source_dtype="fp32", plan={"max_seq": 320}, engines={"decoder": {"bytes": 10, "layers": 3}},
              op_list="TensorRT 10.3", build_s=12.0)
COREML = CoremlInfo(deployment={"target": "iOS18"}, weights="int4", max_context=150,
                    packages={"decoder": {"path": "Decoder.mlpackage", "outputs": {"logits": [1, "T", 1024]}}},
                    compression={"decoder": {"mode": "int4"}},
                    embed_tokens=CoremlEmbeddings("embed_tokens.npy", [1024, 256], "float16", "C", 128),
                    causal_mask={"visible": 0.0}, kv_cache={"dtype": "float16"}, coremltools="8.3",
                    validation={"skipped": "not macOS"}, source="", export_s=3.0)
EXECUTORCH = ExecutorchInfo(pte="model.pte", tokenizer="tokenizer.model", quantize="8da4w",
                            quantization={"group_size": 32}, max_seq_len=256,
                            methods={"text_decoder": {"inputs": {"input_pos": ["int64", 1]}}},
                            constant_methods={"get_eos_ids": [2]},
                            kv_cache=KvCache(["batch", "num_kv_heads", "max_seq_len", "head_dim"], 2, True, "float32"),
                            executorch="1.5.1", token_check=TOKEN_CHECK)
INFOS = {"onnx": ONNX, "gguf": GGUF, "trt": TRT, "coreml": COREML, "executorch": EXECUTORCH}


def _manifest(target: str, template: ChatTemplate | None = None) -> Manifest:
    return Manifest(target, ModelSummary(preset="tiny", integrator="ldpv2", vocab_size=1024, params={"llm": 7}),
                    PreprocessConfig(), template or get_template("llamacpp_vicuna"), TokenConfig(eos_id=5),
                    copy.deepcopy(INFOS[target]), [FileEntry("weights.bin", "decoder")], ExporterInfo("test", {"a": "1"}))


def _write(root: Path, manifest: Manifest) -> Path:
    with BundleWriter(root) as w:
        w.path("weights.bin").write_bytes(b"\x00\x01" * 64)
        return w.commit(manifest)


@pytest.fixture
def onnx_data(tmp_path) -> tuple[Path, dict]:
    root = _write(tmp_path / "b", _manifest("onnx"))
    return root, json.loads((root / MANIFEST).read_text())


def _rewrite(root: Path, data: dict) -> None:
    (root / MANIFEST).write_text(json.dumps(data))


# --- writer -> reader -----------------------------------------------------------------------------


def test_every_bundle_target_has_its_info_type():
    assert set(BUNDLE_TARGETS) == set(INFOS) and set(BUNDLE_TARGETS) < set(TARGET_INFO)


@pytest.mark.parametrize("target", BUNDLE_TARGETS)
def test_each_targets_manifest_round_trips_typed(tmp_path, target):
    written = _manifest(target)
    root = _write(tmp_path / target, written)
    back = read_manifest(root)
    assert isinstance(back.target_info, TARGET_INFO[target])
    assert back.target_info == INFOS[target]  # nested dataclasses included (token checks, graphs, device)
    assert back.chat_template == get_template("llamacpp_vicuna") and back.tokens == TokenConfig(eos_id=5)
    assert back.exporter.name == "test" and back.exporter.created  # stamped on commit
    assert back.format_version == FORMAT_VERSION == 2
    assert to_dict(back) == to_dict(written)


def test_a_manifest_needs_its_targets_info_type():
    with pytest.raises(TypeError, match="OnnxInfo"):
        Manifest("onnx", ModelSummary(), PreprocessConfig(), get_template("plain"), TokenConfig(), copy.deepcopy(GGUF))
    with pytest.raises(BundleError, match="unknown bundle target 'tensorrt'"):
        Manifest("tensorrt", ModelSummary(), PreprocessConfig(), get_template("plain"), TokenConfig(), TRT)


# --- refused manifests ----------------------------------------------------------------------------


def test_a_version_1_bundle_is_refused_with_the_fix(onnx_data):
    root, data = onnx_data
    v1 = {**data, "format_version": 1, "chat_template": "llamacpp_vicuna",
          "tokens": {"bos_id": 1, "eos_id": 2, "pad_id": 0, "unk_id": 0, "image_token": "<image>"},
          "target_info": {"opset": 18, "tensorrt_refusal": None}}
    _rewrite(root, v1)
    with pytest.raises(BundleError, match=r"format version 1 .*reads version 2: re-export the bundle with this "
                                          r"edgevlm \(edgevlm export onnx --model MODEL_DIR --out DIR\)"):
        read_manifest(root)


@pytest.mark.parametrize("where, value, message", [
    (("target_info", "opset"), "eighteen", "target_info.opset: expected int, got 'eighteen'"),
    (("target_info", "kv_cache", "in_place"), "yes", "target_info.kv_cache.in_place: expected bool"),
    (("target_info", "graphs"), ["decoder"], "target_info.graphs: expected a mapping, got list"),
    (("target_info", "token_check", "kl_mean"), "low", "target_info.token_check.kl_mean: expected float"),
    (("target_info", "int8"), "portable", "target_info.int8: expected a mapping, got str"),
    (("tokens", "eos_id"), "two", "tokens.eos_id: expected int, got 'two'"),
    (("chat_template",), "llamacpp_vicuna", "chat_template: expected a mapping, got str"),
    (("model",), 5, "model: expected a mapping, got int"),
    (("files", 0, "size"), "big", r"files\[0\].size: expected int"),
    (("exporter", "versions", "a"), ["1"], "exporter.versions.a: expected str"),
])
def test_malformed_fields_are_bundle_errors_naming_the_field(onnx_data, where, value, message):
    root, data = onnx_data
    node = data
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    _rewrite(root, data)
    with pytest.raises(BundleError, match=f"malformed manifest: {message}"):
        read_manifest(root, verify=False)


@pytest.mark.parametrize("change, message", [
    (lambda d: d["target_info"].pop("kv_cache"), r"target_info: missing key\(s\) kv_cache"),
    (lambda d: d["target_info"].update(tensorrt_refusal=None), r"target_info: unknown key\(s\) tensorrt_refusal"),
    (lambda d: d.update(target="tensorrt"), "unknown bundle target 'tensorrt'; valid: onnx, gguf, trt, coreml"),
    (lambda d: d.update(target="torch"), "unknown bundle target 'torch'"),
    (lambda d: d.pop("tokens"), r"missing key\(s\) tokens"),
])
def test_missing_unknown_and_mistargeted_manifests_are_refused(onnx_data, change, message):
    root, data = onnx_data
    change(data)
    _rewrite(root, data)
    with pytest.raises(BundleError, match=message):
        read_manifest(root, verify=False)


# --- the chat template: pieces in the bundle, names only for built-ins ----------------------------


def test_unknown_template_names_are_errors_listing_the_valid_ones():
    from edgevlm.runtime.processor import Processor

    with pytest.raises(EdgeVLMError, match="unknown chat template 'chatml'; valid: vicuna_v1, llamacpp_vicuna, plain"):
        get_template("chatml")
    with pytest.raises(EdgeVLMError, match="unknown chat template 'chatml'"):
        Processor.create(None, "chatml", PreprocessConfig())


def test_a_template_the_runtime_does_not_know_runs_from_its_pieces(tmp_path):
    own = dataclasses.replace(TEMPLATES["vicuna_v1"], name="house_style_v3", system="Answer briefly.")
    assert own.name not in TEMPLATES
    m = read_manifest(_write(tmp_path / "b", _manifest("gguf", own)))
    assert m.chat_template == own
    assert m.chat_template.prompt_text("<image>\nWhat?", first=True) == \
        "Answer briefly. USER: <image>\nWhat? ASSISTANT:"


# --- one tokenizer file list ----------------------------------------------------------------------


def test_model_dirs_and_bundles_copy_the_same_tokenizer_files(tiny_model, tmp_path, monkeypatch):
    """``added_tokens.json`` (dropped by bundles before) travels like every other tokenizer file."""
    pytest.importorskip("torch")
    import shutil

    from edgevlm.export.common import copy_tokenizer
    from edgevlm.model.checkpoint import save_model

    src = tmp_path / "tok"
    shutil.copytree(tiny_model.tokenizer_dir, src)
    for name in TOKENIZER_FILES:
        if not (src / name).exists():
            (src / name).write_text("{}")  # every listed file present, whatever the preset ships
    monkeypatch.setattr(tiny_model, "tokenizer_dir", str(src))
    model_dir = save_model(tiny_model, tmp_path / "model")
    with BundleWriter(tmp_path / "bundle") as w:
        entries = copy_tokenizer(tiny_model, w)
        staged = {p.name for p in w.dir.iterdir()}
    assert {e.path for e in entries} == staged == set(TOKENIZER_FILES)
    assert {p.name for p in model_dir.iterdir()} >= set(TOKENIZER_FILES)
    assert [e.role for e in entries if e.path == "tokenizer.json"] == ["tokenizer"]


# --- the token check's prompt count: checked before any slow load ---------------------------------


@pytest.mark.parametrize("target", ["onnx", "gguf"])
def test_a_bad_token_check_count_fails_before_the_model_loads(target, tmp_path, capsys):
    pytest.importorskip("torch")
    from edgevlm.cli import main

    missing = str(tmp_path / "no-such-model")  # loading it would fail with another message
    assert main(["export", target, "--model", missing, "--out", str(tmp_path / "o"), "--token-check", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--token-check must be an integer >= 0, got -1" in err[0]
    assert not (tmp_path / "o").exists()


# --- real exports ---------------------------------------------------------------------------------


def _answer(bundle: Path, backend: str, image: Path, **options) -> list[int]:
    from edgevlm.runtime import Runtime

    with Runtime.load(bundle, backend=backend, **options) as rt:
        return rt.generate(image, "What colour is the circle?", max_new_tokens=3).token_ids


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("manifest_img") / "x.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path)
    return path


def test_a_real_onnx_export_reads_back_typed_and_runs(tiny_model, tmp_path, image):
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from edgevlm.export.to_onnx import export_onnx

    root = export_onnx(tiny_model, tmp_path / "onnx", exporter="torchscript", token_check=1, progress=False)
    m = read_manifest(root)
    info = m.target_info
    assert isinstance(info, OnnxInfo) and isinstance(info.kv_cache, KvCache) and isinstance(info.token_check, TokenCheck)
    assert set(info.graphs) == {"vision_encoder", "embed_tokens", "decoder"}
    assert all(isinstance(g, OnnxGraph) for g in info.graphs.values())
    assert m.tokens == tiny_model.cfg.tokens and m.chat_template == get_template(tiny_model.cfg.chat_template)
    assert set(TOKENIZER_FILES) >= {f.path for f in m.files if f.role.startswith("tokenizer")}
    ids = _answer(root, "ort", image)
    assert 1 <= len(ids) <= 3
    data = json.loads((root / MANIFEST).read_text())  # a template this runtime does not know: same answer
    data["chat_template"]["name"] = "not_a_builtin"
    _rewrite(root, data)
    assert read_manifest(root).chat_template.name == "not_a_builtin" and _answer(root, "ort", image) == ids


def test_a_real_gguf_export_reads_back_typed_and_runs(tiny_model, tmp_path, image):
    pytest.importorskip("torch")
    pytest.importorskip("llama_cpp")
    from edgevlm.export.to_gguf import export_gguf

    root = export_gguf(tiny_model, tmp_path / "gguf", ["f16"], token_check=1, progress=False)
    m = read_manifest(root)
    info = m.target_info
    assert isinstance(info, GgufInfo) and isinstance(info.llama_cpp_usage, LlamaCppUsage)
    assert info.llm == {"f16": "llm-f16.gguf"} and isinstance(info.token_check["f16"], TokenCheck)
    assert m.tokens == tiny_model.cfg.tokens
    assert 1 <= len(_answer(root, "llamacpp", image)) <= 3
