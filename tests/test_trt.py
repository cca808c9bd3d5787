"""TensorRT (the supported-operator check: test_trt_ops.py): the build plan (profiles, flags,
dry run, trtexec lines) from real ONNX bundles, the no-TensorRT exit, the runtime's pure parts
(engine/GPU compatibility, KV ping-pong pairing, profile choice, buffer sizes). No TensorRT needed.

The ``tensorrt`` tests build engines for the tiny model and check greedy-token parity against ONNX
Runtime; they run wherever TensorRT and a CUDA GPU exist and are skipped elsewhere.
"""
from __future__ import annotations

import copy
import json
import shlex
import subprocess
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("torch")

from onnx import TensorProto, helper  # noqa: E402

from edgevlm.export import trt_plan  # noqa: E402
from edgevlm.runtime import cuda_device  # noqa: E402
from edgevlm.runtime.backends import trt as rtrt  # noqa: E402
from edgevlm.runtime.errors import BundleError, EdgeVLMError  # noqa: E402
from edgevlm.runtime.graph_io import (  # noqa: E402
    ATTENTION_MASK, INPUTS_EMBEDS, LOGITS, PIXEL_VALUES, POSITION_IDS, is_past, past_key, past_names, present_names,
)
from edgevlm.runtime.manifest import read_manifest  # noqa: E402
from edgevlm.runtime.target_info import TrtDevice, TrtInfo  # noqa: E402

from conftest import REPO  # noqa: E402


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_bundle(tiny_model, tmp_path_factory):
    """An fp32 ONNX bundle of the small tiny model, exported the default way (dynamo)."""
    from edgevlm.export.to_onnx import export_onnx

    return export_onnx(tiny_model, tmp_path_factory.mktemp("trt_src") / "onnx", progress=False)


@pytest.fixture(scope="module")
def manifest(onnx_bundle):
    return read_manifest(onnx_bundle)


def plan_for(bundle, manifest, **kw):
    return trt_plan.make_plan(bundle, manifest, "/out/trt", **kw)


def _model(nodes, inputs, outputs, inits=(), opset=18, extra_opsets=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])


def _vi(name, dims, t=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, t, dims)


# --- the plan -------------------------------------------------------------------------------------


def test_decoder_profiles_cover_prefill_and_decode(onnx_bundle, manifest):
    m = manifest.model
    plan = plan_for(onnx_bundle, manifest, max_seq=512)
    dec = plan.engine("decoder")
    prefill, decode = dec.profiles
    assert [p.name for p in dec.profiles] == ["prefill", "decode"]
    kv = past_key(0)
    assert prefill.shapes[kv].min == prefill.shapes[kv].max == (1, m.num_kv_heads, 0, m.head_dim)  # empty cache
    assert prefill.shapes[INPUTS_EMBEDS].max == (1, 512, m.hidden_size)
    assert decode.shapes[INPUTS_EMBEDS].min == decode.shapes[INPUTS_EMBEDS].max == (1, 1, m.hidden_size)
    assert decode.shapes[kv].max == (1, m.num_kv_heads, 511, m.head_dim)
    for p in dec.profiles:  # total = past + seq at every corner of every profile
        for which in ("min", "opt", "max"):
            s = {n: getattr(r, which) for n, r in p.shapes.items()}
            assert s[ATTENTION_MASK][1] == s[kv][2] + s[INPUTS_EMBEDS][1]
            assert s[POSITION_IDS] == s[INPUTS_EMBEDS][:2]
    assert len([n for n in decode.shapes if is_past(n)]) == 2 * m.num_layers
    vision = plan.engine("vision_encoder").profiles[0].shapes[PIXEL_VALUES]
    assert vision.min == (1, 3, m.image_size, m.image_size) and vision.max[0] == 1


def test_profiles_from_manifest_equal_profiles_from_the_onnx_files(onnx_bundle, manifest):
    bare = copy.deepcopy(manifest)
    bare.target_info.graphs = {}  # force reading the graph inputs from the .onnx files
    a = plan_for(onnx_bundle, manifest, max_batch=3, max_seq=400).to_dict()
    b = plan_for(onnx_bundle, bare, max_batch=3, max_seq=400).to_dict()
    assert a["engines"] == b["engines"]


def test_precision_flags(onnx_bundle, manifest):
    fp32 = plan_for(onnx_bundle, manifest, precision="fp32")
    assert all(e.flags == [] and e.clear_flags == ["TF32"] for e in fp32.engines)
    fp16 = plan_for(onnx_bundle, manifest, precision="fp16")
    assert all(e.flags == ["FP16"] and e.int8 is None for e in fp16.engines)
    int8 = plan_for(onnx_bundle, manifest, precision="int8")
    assert int8.engine("vision_encoder").flags == ["FP16", "INT8"] and int8.engine("vision_encoder").int8 == "calibrate"
    assert int8.engine("decoder").flags == ["FP16"] and int8.engine("decoder").notes
    qdq = plan_for(onnx_bundle, manifest, precision="int8", quant={"vision_encoder": "int8"})
    assert qdq.engine("vision_encoder").int8 == "qdq"
    fp8 = plan_for(onnx_bundle, manifest, precision="fp8", quant={"decoder": "fp8"})
    assert fp8.engine("decoder").flags == ["FP16", "FP8"] and fp8.engine("vision_encoder").flags == ["FP16"]


def test_dla_pins_the_vision_batch_and_falls_back_to_the_gpu(onnx_bundle, manifest):
    plan = plan_for(onnx_bundle, manifest, precision="fp16", max_batch=4, dla_core=1)
    v = plan.engine("vision_encoder")
    r = v.profiles[0].shapes[PIXEL_VALUES]
    assert r.min == r.opt == r.max and r.max[0] == 4  # DLA has no dynamic shapes
    assert v.dla_core == 1 and "GPU_FALLBACK" in v.flags
    assert plan.engine("decoder").dla_core is None


@pytest.mark.parametrize("kw, needle", [
    ({"precision": "int4"}, "--precision"), ({"max_batch": 0}, "--max-batch"), ({"max_seq": 10}, "--max-seq"),
    ({"max_seq": 10**6}, "--max-seq"), ({"workspace_gb": 0}, "--workspace-gb"),
    ({"precision": "fp32", "dla_core": 0}, "DLA runs no fp32"), ({"precision": "fp8"}, "FP8 Q/DQ"),
])
def test_bad_options_are_user_errors(onnx_bundle, manifest, kw, needle):
    with pytest.raises(EdgeVLMError, match=needle.replace("-", r"\-")):
        plan_for(onnx_bundle, manifest, **kw)


def _parse_trtexec(line: str) -> tuple[dict, list[dict]]:
    """options, [{"min"|"opt"|"max": {name: shape}}] per profile, from a trtexec command line."""
    args = shlex.split(line)
    assert args[0] == "trtexec"
    opts, profiles = {}, []
    for a in args[1:]:
        key, _, value = a[2:].partition("=")
        if key == "profile":
            assert int(value) == len(profiles)
            profiles.append({})
        elif key.endswith("Shapes"):
            if not profiles or key[:3] in profiles[-1]:
                profiles.append({})
            profiles[-1][key[:3]] = {n: tuple(int(d) for d in s.split("x"))
                                     for n, s in (kv.rsplit(":", 1) for kv in value.split(","))}
        else:
            opts[key] = value
    return opts, profiles


def test_trtexec_lines_round_trip_to_the_plan(onnx_bundle, manifest):
    plan = plan_for(onnx_bundle, manifest, precision="int8", max_batch=2, max_seq=300, workspace_gb=1.5,
                    timing_cache="/tmp/tc.bin", dla_core=0)
    lines = trt_plan.trtexec_lines(plan)
    assert len(lines) == 3
    for line, e in zip(lines, plan.engines):
        opts, profiles = _parse_trtexec(line)
        assert opts["onnx"] == str(onnx_bundle / e.onnx) and opts["saveEngine"] == f"/out/trt/{e.engine}"
        assert opts["memPoolSize"] == "workspace:1536" and opts["timingCacheFile"] == "/tmp/tc.bin"
        assert "skipInference" in opts and "fp16" in opts
        assert len(profiles) == len(e.profiles)
        for got, want in zip(profiles, e.profiles):
            for which in ("min", "opt", "max"):
                assert got[which] == {n: getattr(r, which) for n, r in want.shapes.items()}
        assert ("int8" in opts) == ("INT8" in e.flags)
        assert ("useDLACore" in opts) == (e.graph == "vision_encoder") == ("allowGPUFallback" in opts)
    assert "calib" in _parse_trtexec(lines[0])[0]
    opts, _ = _parse_trtexec(trt_plan.trtexec_lines(plan_for(onnx_bundle, manifest, precision="fp32"))[2])
    assert "noTF32" in opts and "fp16" not in opts and "profile" not in opts


def test_memory_estimate_matches_the_backends_buffers(onnx_bundle, manifest):
    m = manifest.model
    plan = plan_for(onnx_bundle, manifest, max_seq=256)
    est = trt_plan.memory_estimate(manifest, plan)
    present = (1, m.num_kv_heads, 256, m.head_dim)  # what the decode profile's largest step writes
    assert est["KV cache"] == 2 * 2 * m.num_layers * rtrt.nbytes(present, 4)  # ping-pong x (K, V) x layers
    assert est["logits"] == rtrt.nbytes((1, 256, m.vocab_size), 4)


# --- the command line -----------------------------------------------------------------------------


def _cli(*args):
    return subprocess.run([sys.executable, "export/to_trt.py", *args], capture_output=True, text=True,
                          cwd=str(REPO), timeout=300)


def test_dry_run_prints_plan_and_trtexec(onnx_bundle, tmp_path):
    out = _cli("--bundle", str(onnx_bundle), "--out", str(tmp_path / "trt"), "--dry-run", "--max-seq", "400")
    assert out.returncode == 0, out.stderr
    assert "profile 0 (prefill)" in out.stdout and "profile 1 (decode)" in out.stdout
    assert "op check   ok" in out.stdout
    assert len([l for l in out.stdout.splitlines() if l.startswith("trtexec ")]) == 3
    assert not (tmp_path / "trt").exists()


def test_without_tensorrt_exit_2_with_message_and_commands(onnx_bundle, tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    out = _cli("--bundle", str(onnx_bundle), "--out", str(tmp_path / "trt"))
    assert out.returncode == 2
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and "TensorRT" in err[0] and "tensorrt" in err[0]
    assert len([l for l in out.stdout.splitlines() if l.startswith("trtexec ")]) == 3
    assert not (tmp_path / "trt").exists()


def test_bundle_records_the_integrators_tensorrt_refusal(onnx_bundle, tmp_path):
    """to_trt.py reads the refusal from the ONNX manifest (no torch on the board)."""
    import json

    from conftest import copy_bundle

    m = json.loads((onnx_bundle / "manifest.json").read_text())
    assert m["target_info"]["trt_refusal"] == ""
    bundle = copy_bundle(onnx_bundle, tmp_path)
    m["target_info"]["trt_refusal"] = "needs an op TensorRT lacks"
    (bundle / "manifest.json").write_text(json.dumps(m))
    out = _cli("--bundle", str(bundle), "--out", str(tmp_path / "trt"), "--dry-run")
    assert out.returncode == 2
    assert "cannot be built into TensorRT engines: needs an op TensorRT lacks" in out.stderr
    assert not (tmp_path / "trt").exists()


def test_building_on_a_jetson_needs_no_torch(onnx_bundle, tmp_path):
    """The plan, the op check and int8 calibration images come without torch (JetPack boards have none)."""
    code = "\n".join([
        "import sys; sys.modules['torch'] = sys.modules['transformers'] = sys.modules['onnxruntime'] = None",
        "from edgevlm.cli import main",
        "from edgevlm.export.to_trt import _pixels_loader",
        "from edgevlm.runtime.manifest import read_manifest",
        "import edgevlm.runtime.backends.trt, edgevlm.runtime.cuda_device",
        f"px = _pixels_loader(read_manifest({str(onnx_bundle)!r}), None, 2)()",
        "assert len(px) == 2 and px[0].shape == (1, 3, 336, 336), [p.shape for p in px]",
        f"sys.exit(main(['export', 'trt', '--bundle', {str(onnx_bundle)!r}, '--out', {str(tmp_path / 't')!r}, "
        "'--dry-run', '--precision', 'int8']))",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=300)
    assert out.returncode == 0, out.stderr
    assert "FP16, INT8" in out.stdout


def test_cli_user_errors_are_one_line(onnx_bundle, tmp_path):
    out = _cli("--bundle", str(onnx_bundle), "--out", str(tmp_path / "t"), "--dla-core", "0", "--precision", "fp32")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "DLA" in out.stderr
    out = _cli("--bundle", str(tmp_path), "--out", str(tmp_path / "t"), "--dry-run")
    assert out.returncode == 2 and "not a bundle" in out.stderr


# --- the runtime's pure parts ---------------------------------------------------------------------


def test_engine_compatibility_check():
    built = TrtInfo(tensorrt="10.3.0", device=TrtDevice("Orin", "8.7"), precision="fp16", source_bundle="/b/onnx",
                    source_dtype="fp32")
    orin = cuda_device.DeviceInfo("Orin", "8.7")
    assert cuda_device.compatibility(built, "10.3.0.30", orin) == ([], [])  # the build number does not matter
    errors, _ = cuda_device.compatibility(built, "10.7.0", cuda_device.DeviceInfo("NVIDIA H100 80GB HBM3", "9.0"))
    assert len(errors) == 2 and "10.7.0" in errors[0] and "SM 9.0" in errors[1]
    errors, warnings = cuda_device.compatibility(built, "10.3.0", cuda_device.DeviceInfo("Orin (nvgpu)", "8.7"))
    assert errors == [] and warnings
    msg = cuda_device.incompatibility_message("/b/trt", built, errors or ["x"])
    assert "python export/to_trt.py --bundle /b/onnx" in msg
    assert cuda_device.version_key("10.3.0.30") == (10, 3, 0) and cuda_device.version_key("10.3") == (10, 3, 0)


def test_kv_pairs_step_shapes_and_profile_choice(onnx_bundle, manifest):
    m = manifest.model
    dec = plan_for(onnx_bundle, manifest, max_seq=300).engine("decoder")
    names = past_names(m.num_layers)
    outs = [LOGITS, *present_names(m.num_layers)]
    pairs = rtrt.kv_pairs(names, outs)
    assert pairs[0] == ("past_key_values.0.key", "present.0.key") and len(pairs) == len(names)  # the contract
    with pytest.raises(BundleError):
        rtrt.kv_pairs(names, outs[:-1])
    ranges = [{n: (r.min, r.opt, r.max) for n, r in p.shapes.items()} for p in dec.profiles]
    kv = (m.num_kv_heads, m.head_dim)
    prefill = rtrt.step_shapes(0, 150, m.hidden_size, kv, names)
    assert prefill[past_key(0)] == (1, m.num_kv_heads, 0, m.head_dim)
    assert rtrt.pick_profile(ranges, prefill) == 0
    assert rtrt.pick_profile(ranges, rtrt.step_shapes(150, 1, m.hidden_size, kv, names)) == 1
    assert rtrt.pick_profile(ranges, rtrt.step_shapes(299, 1, m.hidden_size, kv, names)) == 1
    with pytest.raises(EdgeVLMError, match="max-seq"):
        rtrt.pick_profile(ranges, rtrt.step_shapes(300, 1, m.hidden_size, kv, names))
    assert rtrt.nbytes((1, 2, 0, 64), 4) == 1 and rtrt.elementwise_max([(1, 5, 3), (1, 2, 7)]) == (1, 5, 7)


def test_backend_refuses_other_bundles_and_missing_libraries(onnx_bundle, manifest, tmp_path):
    from edgevlm.runtime import Runtime
    from edgevlm.runtime.manifest import BundleWriter, FileEntry, Manifest

    with pytest.raises(EdgeVLMError, match="the trt backend cannot read it \\(backend='ort' does"):
        Runtime.load(onnx_bundle, backend="trt")
    with BundleWriter(tmp_path / "fake-trt") as w:  # a TensorRT bundle as to_trt.py lays it out
        for g in trt_plan.GRAPHS:
            w.path(f"{g}.engine").write_bytes(b"not an engine")
        w.path("tokenizer.json").write_bytes((onnx_bundle / "tokenizer.json").read_bytes())
        files = [FileEntry(f"{g}.engine", g) for g in trt_plan.GRAPHS] + [FileEntry("tokenizer.json", "tokenizer")]
        info = TrtInfo(tensorrt="10.3.0", device=TrtDevice("Orin", "8.7"), precision="fp16",
                       source_bundle=str(onnx_bundle), source_dtype="fp32")
        root = w.commit(Manifest("trt", manifest.model, manifest.preprocess, manifest.chat_template,
                                 manifest.tokens, info, files))
    assert read_manifest(root).target_info == info  # written and read back typed
    with pytest.raises(EdgeVLMError, match="unknown trt backend option"):
        Runtime.load(root, backend="trt", providers="cuda")  # an ort option; threads is every backend's
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(EdgeVLMError, match="tensorrt"):
            Runtime.load(root, backend="trt")


# --- on a machine with TensorRT and a CUDA GPU ----------------------------------------------------


@pytest.fixture(scope="module")
def toolchain():
    from edgevlm.export import trt_build

    try:
        tc = trt_build.probe()
    except trt_build.TensorRTUnavailable as e:
        pytest.skip(f"needs TensorRT and a CUDA GPU: {e}")
    yield tc
    tc.cuda.close()


def _build(onnx_bundle, out, precision):
    from edgevlm.cli import main

    assert main(["export", "trt", "--bundle", str(onnx_bundle), "--out", str(out), "--precision", precision,
                 "--max-seq", "320", "--timing-cache", str(out.parent / "timing.cache")]) == 0
    return out


@pytest.mark.tensorrt
def test_fp32_engines_match_onnx_runtime_greedy_tokens(toolchain, onnx_bundle, shapes_dir, tmp_path):
    from edgevlm.runtime import Runtime

    out = _build(onnx_bundle, tmp_path / "trt32", "fp32")
    info = read_manifest(out).target_info
    assert info.tensorrt == toolchain.version and info.device.sm == toolchain.device.sm
    assert set(info.engines) == set(trt_plan.GRAPHS) and info.source_dtype == "fp32"
    image = sorted((shapes_dir / "images").iterdir())[0]
    prompt = "What colour is the circle?"
    with Runtime.load(onnx_bundle, backend="ort") as ort_rt, Runtime.load(out, backend="trt") as trt_rt:
        px = ort_rt.pixel_values(image)
        np.testing.assert_allclose(trt_rt.backend.encode_image(px), ort_rt.backend.encode_image(px), atol=1e-3)
        a = ort_rt.generate(image, prompt, max_new_tokens=24, ignore_eos=True)
        b = trt_rt.generate(image, prompt, max_new_tokens=24, ignore_eos=True)
    print("ort", a.token_ids, "\ntrt", b.token_ids, "\ntimings", b.timings.to_dict())
    assert b.token_ids == a.token_ids


@pytest.mark.tensorrt
def test_fp16_engines_and_the_compatibility_guard(toolchain, onnx_bundle, shapes_dir, tmp_path):
    from edgevlm.runtime import Runtime

    out = _build(onnx_bundle, tmp_path / "trt16", "fp16")
    image = sorted((shapes_dir / "images").iterdir())[0]
    with Runtime.load(onnx_bundle, backend="ort") as ort_rt, Runtime.load(out, backend="trt") as trt_rt:
        visual = ort_rt.backend.encode_image(ort_rt.pixel_values(image))[0]  # [M, D]
        segments = [np.array([1, 5, 9], np.int64), visual, np.array([17, 4], np.int64)]
        ref, got = ort_rt.backend.prefill(segments), trt_rt.backend.prefill(segments)
        ref_next, got_next = ort_rt.backend.decode(int(ref.argmax())), trt_rt.backend.decode(int(ref.argmax()))
        b = trt_rt.generate(image, "What colour is the circle?", max_new_tokens=8)
    scale = float(np.abs(ref).max())
    print(f"fp16 prefill max |trt - ort| = {np.abs(got - ref).max():.3g} (scale {scale:.3g})", b.timings.to_dict())
    assert np.abs(got - ref).max() < 0.05 * scale and np.abs(got_next - ref_next).max() < 0.05 * scale
    assert 1 <= b.timings.n_generated <= 8
    data = json.loads((out / "manifest.json").read_text())
    data["target_info"]["device"]["sm"] = "1.0"  # pretend it was built for another GPU
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="Rebuild them on this machine"):
        Runtime.load(out, backend="trt")
