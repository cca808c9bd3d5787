"""The ``ort`` backend through ``Runtime``: fidelity to PyTorch (logits, greedy tokens, held-out
accuracy per variant on the trained fixture model), IO binding, .ort files, streaming, the CLI, and
bad input (altered bundles, bad images, over-long prompts). Real ONNX Runtime, no test doubles."""
from __future__ import annotations

import io
import json
import shutil
import warnings

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from PIL import Image  # noqa: E402

from edgevlm import load_model  # noqa: E402
from edgevlm.export.to_onnx import export_fp32_graphs, export_onnx  # noqa: E402
from edgevlm.runtime import Runtime  # noqa: E402
from edgevlm.model.torch_backend import TorchBackend  # noqa: E402
from edgevlm.runtime.errors import BundleError, ContextLengthError, EdgeVLMError, ImageError  # noqa: E402
from edgevlm.runtime.generate import split_segments  # noqa: E402

from conftest import assert_clear_tokens, assert_parity, copy_bundle, perturb_onnx_weight, split_records  # noqa: E402

VARIANTS = {"fp32": ("fp32", "none"), "fp16": ("fp16", "none"), "int8": ("fp32", "int8"), "int4": ("fp32", "int4")}
MAX_DROP = {"fp16": 0.01, "int8": 0.03}  # accuracy points (as fractions) below fp32; int4 is reported only
FP32_ATOL = 1e-3  # logits of fp32 ONNX Runtime vs torch (measured ~1e-5)


def _image(seed: int = 0, size=(300, 220)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size[::-1], 3), dtype=np.uint8))


# --- a random tiny model: runtime behaviour and bad input -------------------------------------------


@pytest.fixture(scope="module")
def tiny_graphs(tiny_model, tmp_path_factory):
    return export_fp32_graphs(tiny_model, tmp_path_factory.mktemp("ort_rt_graphs"), exporter="torchscript")


@pytest.fixture(scope="module")
def bundle(tiny_model, tiny_graphs, tmp_path_factory):
    return export_onnx(tiny_model, tmp_path_factory.mktemp("ort_rt") / "tiny", fp32_graphs=tiny_graphs,
                       progress=False)


@pytest.fixture(scope="module")
def gqa_bundle(tiny_model, tiny_graphs, tmp_path_factory):
    """fp32 with the GroupQueryAttention decoder (in-place KV cache)."""
    return export_onnx(tiny_model, tmp_path_factory.mktemp("ort_rt") / "tiny-gqa", attention="gqa",
                       fp32_graphs=tiny_graphs, progress=False)


@pytest.fixture(scope="module")
def rt(bundle):
    with Runtime.load(bundle, backend="ort", threads=1) as r:
        yield r


def _parity(rt, model, image, prompt: str, steps: int):
    """Teacher-forced parity of the runtime's backend with torch, then the runtime's own greedy run."""
    ids, pixels = rt.processor(image, prompt)
    cmp = assert_parity(TorchBackend(model), rt.backend, ids, pixels, steps, FP32_ATOL)
    got = rt.generate(image, prompt, max_new_tokens=steps, ignore_eos=True)
    assert_clear_tokens(got.token_ids, cmp, FP32_ATOL)
    return cmp, got


def test_generate_matches_torch_and_reports_timings(rt, tiny_model):
    img = _image(1)
    _, r = _parity(rt, tiny_model, img, "What colour is the circle?", 10)
    t = r.timings
    assert t.n_visual_tokens == tiny_model.n_visual_tokens and t.n_generated == 10
    assert t.n_prompt_tokens == len(rt.prompt_ids("What colour is the circle?", True)) - 1
    assert t.vision_ms > 0 and t.prefill_ms > 0 and t.ttft_ms >= t.prefill_ms and t.decode_tok_s > 0


def test_in_place_kv_cache_matches_torch_while_it_grows(gqa_bundle, tiny_model, monkeypatch):
    from edgevlm.runtime.backends import ort as ort_backend

    monkeypatch.setattr(ort_backend, "KV_BLOCK", 16)  # grow (and copy) the buffers several times
    with Runtime.load(gqa_bundle, backend="ort", threads=1) as r:
        assert r.backend.in_place
        for prompt, n in (("What colour is the circle?", 40), ("Is there a square?", 12)):  # reused buffers
            _parity(r, tiny_model, _image(9), prompt, n)
        cap = r.backend._buffers[0].shape[2]
        assert cap % 16 == 0 and cap >= tiny_model.n_visual_tokens + 40
    with Runtime.load(gqa_bundle, backend="ort", io_binding=False) as r:  # the same graph, concat mode
        assert not r.backend.in_place
        _parity(r, tiny_model, _image(9), "Is there a square?", 12)


def test_parity_check_fails_on_a_damaged_decoder(bundle, tiny_model, tmp_path):
    """The check above on a copy whose decoder has one perturbed weight matrix (noise of 5% of its std)."""
    b = copy_bundle(bundle, tmp_path)
    perturb_onnx_weight(b / "decoder_model_merged.onnx", rel=0.05)
    with Runtime.load(b, backend="ort", verify=False, threads=1) as r, pytest.raises(AssertionError, match="logits"):
        _parity(r, tiny_model, _image(1), "What colour is the circle?", 10)


def test_parity_check_fails_on_a_damaged_vision_encoder(bundle, tiny_model, tmp_path):
    b = copy_bundle(bundle, tmp_path)
    perturb_onnx_weight(b / "vision_encoder.onnx", rel=0.25)
    with Runtime.load(b, backend="ort", verify=False, threads=1) as r, pytest.raises(AssertionError, match="logits"):
        _parity(r, tiny_model, _image(1), "What colour is the circle?", 10)


def test_io_binding_and_plain_runs_agree(bundle):
    outs = []
    for io_binding in (True, False):
        with Runtime.load(bundle, backend="ort", io_binding=io_binding, threads=1) as r:
            outs.append(r.generate(_image(2), "Is there a square?", max_new_tokens=8, ignore_eos=True).token_ids)
    assert outs[0] == outs[1]


def test_text_only_prompt_and_stream(rt):
    r = rt.generate(None, "how many shapes are there?", max_new_tokens=6, ignore_eos=True)
    assert r.timings.n_visual_tokens == 0 and r.timings.vision_ms == 0
    s = rt.stream(_image(3), "What shape is red?", max_new_tokens=8, ignore_eos=True)
    pieces = list(s)
    assert "".join(pieces) == s.result.text
    assert s.result.token_ids == rt.generate(_image(3), "What shape is red?", max_new_tokens=8,
                                             ignore_eos=True).token_ids


def test_vision_encoder_batches(rt):
    px = np.concatenate([rt.pixel_values(_image(4)), rt.pixel_values(_image(5))])  # [2, 3, S, S]
    both = rt.backend.encode_image(px)
    one = rt.backend.encode_image(px[1:])
    assert both.shape[0] == 2
    np.testing.assert_allclose(both[1], one[0], atol=1e-5)


def test_prompt_longer_than_context_is_a_clear_error(rt):
    n_ctx = rt.backend.n_ctx
    with pytest.raises(ContextLengthError, match=rf"(?s)\d+ tokens.*context is {n_ctx} positions"):
        rt.generate(_image(6), "red " * (n_ctx + 10), max_new_tokens=4)
    assert rt.generate(_image(6), "What colour?", max_new_tokens=2).timings.n_generated >= 1


def test_bad_images_are_clear_errors_and_the_runtime_keeps_working(rt, tmp_path):
    buf = io.BytesIO()
    _image(7).save(buf, format="JPEG")
    cases = {"not an image": b"hello, I am text", "truncated": buf.getvalue()[: len(buf.getvalue()) // 3]}
    for what, data in cases.items():
        with pytest.raises(ImageError):
            rt.generate(data, "What colour?", max_new_tokens=2)
    bomb = tmp_path / "bomb.png"
    Image.new("1", (9000, 9000)).save(bomb)  # 81 Mpx (over the 64 Mpx limit), ~10 KB on disk
    with pytest.raises(ImageError, match="bomb.png"):
        rt.generate(str(bomb), "What colour?", max_new_tokens=2)
    assert rt.generate(_image(7), "What colour?", max_new_tokens=2).timings.n_generated >= 1


def test_missing_or_altered_files_are_named(bundle, tmp_path):
    b = copy_bundle(bundle, tmp_path)
    (b / "embed_tokens.onnx").unlink()
    with pytest.raises(BundleError, match="embed_tokens.onnx.*missing"):
        Runtime.load(b, backend="ort")
    shutil.rmtree(b)
    b = copy_bundle(bundle, tmp_path)
    data = bytearray((b / "decoder_model_merged.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    (b / "decoder_model_merged.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="decoder_model_merged.onnx.*sha256"):
        Runtime.load(b, backend="ort")


@pytest.mark.parametrize("version", [0, 1, 3])
def test_other_manifest_versions_are_refused(bundle, tmp_path, version):
    b = copy_bundle(bundle, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    m["format_version"] = version
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=f"format version {version}.*reads version 2.*re-export"):
        Runtime.load(b, backend="ort")


def test_backend_options_are_checked(bundle):
    with pytest.raises(EdgeVLMError, match="TensorrtExecutionProvider is not available"):
        Runtime.load(bundle, backend="ort", providers="tensorrt")
    with pytest.raises(EdgeVLMError, match="unknown ort backend option.*bogus"):
        Runtime.load(bundle, backend="ort", bogus=1)
    with pytest.raises(EdgeVLMError, match="graph_optimization"):
        Runtime.load(bundle, backend="ort", graph_optimization="max")
    with pytest.raises(BundleError, match="vision_encoder_ort"):  # no .ort files in this bundle
        Runtime.load(bundle, backend="ort", model_format="ort")
    with pytest.raises(EdgeVLMError, match="unknown backend 'nope'"):
        Runtime.load(bundle, backend="nope")


def test_cli_run(bundle, tmp_path, capsys):
    from edgevlm.cli import main

    img = tmp_path / "x.jpg"
    _image(8).save(img)
    assert main(["run", "--bundle", str(bundle), "--image", str(img), "--prompt", "What colour?",
                 "--max-new-tokens", "4", "--json", "--threads", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["timings"]["n_generated"] >= 1 and isinstance(out["text"], str)
    assert main(["run", "--bundle", str(bundle), "--image", str(img), "--prompt", "What colour?",
                 "--max-new-tokens", "4", "--stream"]) == 0
    captured = capsys.readouterr()
    assert "visual" in captured.err and "decode" in captured.err
    assert main(["run", "--bundle", str(tmp_path), "--prompt", "hi"]) == 2
    assert "not a bundle" in capsys.readouterr().err


# --- the trained fixture model: fidelity and accuracy per variant ------------------------------------


@pytest.fixture(scope="module")
def trained(trained_tiny):
    return load_model(trained_tiny).float().eval()


@pytest.fixture(scope="module")
def trained_bundles(trained, trained_tiny, trained_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("ort_trained")
    graphs = export_fp32_graphs(trained, root / "fp32_graphs")
    return {name: export_onnx(trained, root / name, dt, q, ort_format=(name == "int4"),
                              calib_data=str(trained_data / "train.json"), calib_count=32,
                              source=str(trained_tiny), fp32_graphs=graphs, progress=False)
            for name, (dt, q) in VARIANTS.items()}


def test_fp32_logits_match_torch_in_prefill_and_decode(trained, trained_bundles, trained_data):
    from edgevlm.train.data.llava import load_record_image

    tb = TorchBackend(trained)
    ob = Runtime.load(trained_bundles["fp32"], backend="ort").backend
    worst = 0.0
    for rec in split_records(trained_data, "test")[:6]:
        px = trained.preprocess(load_record_image(rec)).numpy()
        ids = trained.prompt_ids(rec.turns[0][0], with_image=True)
        vis_t, vis_o = tb.encode_image(px), ob.encode_image(px)
        worst_vis = float(np.abs(vis_t - vis_o).max())
        lt, lo = tb.prefill(split_segments(ids, vis_t)), ob.prefill(split_segments(ids, vis_t))
        diffs = [float(np.abs(lt - lo).max())]
        for _ in range(8):  # decode the torch backend's greedy tokens in both
            tok = int(lt.argmax())
            lt, lo = tb.decode(tok), ob.decode(tok)
            diffs.append(float(np.abs(lt - lo).max()))
        worst = max(worst, *diffs)
        assert worst_vis < 1e-4
    print(f"max |logit(ort fp32) - logit(torch)| over prefill + 8 decode steps, 6 prompts: {worst:.3g}")
    assert worst < 1e-3


def test_ort_format_files_give_the_same_tokens(trained_bundles, trained_data):
    from edgevlm.train.data.llava import load_record_image

    b = trained_bundles["int4"]
    with Runtime.load(b, backend="ort") as a, Runtime.load(b, backend="ort", model_format="ort") as o:
        for rec in split_records(trained_data, "test")[:4]:
            img, q = load_record_image(rec), rec.turns[0][0]
            assert a.generate(img, q, max_new_tokens=8).token_ids == o.generate(img, q, max_new_tokens=8).token_ids


N_TORCH = 40  # held-out prompts also answered by the torch model (fp32 ONNX must give identical tokens)


@pytest.mark.slow
def test_accuracy_per_variant(trained, trained_bundles, trained_data, tmp_path_factory):
    from edgevlm.train.data.llava import load_record_image
    from edgevlm.train.evaluate import format_table, majority_answers, score

    records = split_records(trained_data, "test")
    majority = majority_answers(split_records(trained_data, "train"))
    images = {rec.id: load_record_image(rec) for rec in records}
    tokens: dict[str, dict[str, list[int]]] = {}

    def answer_with(name, generate):
        def answer(rec, q):
            r = generate(images[rec.id], q, max_new_tokens=12)
            tokens.setdefault(name, {})[rec.id] = r.token_ids
            return r.text
        return answer

    def first_logits(rt):  # a finer fidelity signal than exact-match accuracy: prefill logits [N, V]
        out = []
        for rec in records[:20]:
            vis = rt.backend.encode_image(rt.pixel_values(images[rec.id]))
            out.append(rt.backend.prefill(split_segments(rt.prompt_ids(rec.turns[0][0], True), vis)))
        return np.stack(out)

    results = {f"torch (first {N_TORCH})": score(records[:N_TORCH], answer_with("torch", trained.generate),
                                                  majority, progress=False)}
    logits = {}
    for name, b in trained_bundles.items():
        with Runtime.load(b, backend="ort") as r:
            results[name] = score(records, answer_with(name, r.generate), majority, progress=False)
            logits[name] = first_logits(r)
        same = sum(tokens[name][k] == tokens["fp32"][k] for k in tokens["fp32"])
        results[name]["same_tokens_as_fp32"] = f"{same}/{len(records)}"
        results[name]["prefill_logits_vs_fp32"] = {
            "max_abs_diff": float(np.abs(logits[name] - logits["fp32"]).max()),
            "scale": float(np.abs(logits["fp32"]).max()), "n_prompts": len(logits[name])}
    out = tmp_path_factory.mktemp("onnx_accuracy") / "accuracy.json"
    out.write_text(json.dumps(results, indent=2))
    for name, res in results.items():
        extra = "" if "same_tokens_as_fp32" not in res else (
            f", same tokens as fp32: {res['same_tokens_as_fp32']}, prefill logits max |diff| vs fp32 "
            f"{res['prefill_logits_vs_fp32']['max_abs_diff']:.3g} (scale {res['prefill_logits_vs_fp32']['scale']:.3g})")
        print(f"\n== {name} (held-out, n={res['overall']['n']}{extra}) ==\n{format_table(res)}")
    print(f"written to {out}")
    mismatched = [rid for rid, ids in tokens["torch"].items() if tokens["fp32"][rid] != ids]
    assert not mismatched, f"fp32 ONNX and torch greedy tokens differ on {mismatched}"
    fp32 = results["fp32"]["overall"]["accuracy"]
    for name, drop in MAX_DROP.items():
        assert results[name]["overall"]["accuracy"] >= fp32 - drop - 1e-9, (name, results[name]["overall"], fp32)


def test_a_vnni_int8_bundle_warns_on_a_cpu_that_saturates(bundle, tmp_path, monkeypatch):
    from edgevlm.runtime import hostcpu

    b = copy_bundle(bundle, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    from edgevlm.export.onnx_quant import INT8_FORMATS

    m["target_info"]["int8"] = INT8_FORMATS["vnni"].to_dict()
    (b / "manifest.json").write_text(json.dumps(m))
    monkeypatch.setattr(hostcpu, "u8s8_saturates", lambda flags=None: True)
    with pytest.warns(RuntimeWarning, match="--int8-target portable"):
        Runtime.load(b, backend="ort").close()
    monkeypatch.setattr(hostcpu, "u8s8_saturates", lambda flags=None: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Runtime.load(b, backend="ort").close()
