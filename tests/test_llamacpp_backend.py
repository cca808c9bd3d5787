"""Backend ``llamacpp``: GGUF bundles run by real llama.cpp (llama-cpp-python, mtmd bindings),
compared with the torch model -- image embeddings, logits, greedy tokens, held-out accuracy per
question type for every quant type -- plus the interface (options, streaming) and bad files."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("gguf", reason="GGUF export needs the gguf package (pip install 'edgevlm[export]')")
pytest.importorskip("llama_cpp", reason="the llamacpp backend needs llama-cpp-python (pip install 'edgevlm[llamacpp]')")

from conftest import (SMALL, assert_clear_tokens, assert_parity, copy_bundle, perturb_gguf_tensor,  # noqa: E402
                      split_records)

from edgevlm.runtime.errors import BundleError, EdgeVLMError  # noqa: E402
from edgevlm.runtime.fidelity import cosine  # noqa: E402

QUANTS = ["f16", "q8_0", "q5_k_m", "q4_k_m", "q4_0"]
THREADS = 1  # the test machine is shared: 2+ OpenMP threads on 2 busy cores crawl
COS_MIN = 0.999
N_HELDOUT = 60


def _image(seed: int = 0, size=(300, 400)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


def _export(model, out, quants, **kw):
    from edgevlm.export.to_gguf import export_gguf

    return export_gguf(model, out, quants, progress=False, **kw)


def _runtime(bundle, quant="f16", **kw):
    from edgevlm.runtime import Runtime

    return Runtime.load(bundle, backend="llamacpp", quant=quant, threads=THREADS, **kw)


def _gguf_integrators():
    from edgevlm.export.gguf_mmproj import gguf_projectors

    return sorted(gguf_projectors())


# --- every GGUF-capable integrator, random weights -----------------------------------------------


@pytest.fixture(scope="module", params=_gguf_integrators())
def small_bundle(request, tiny_model, tmp_path_factory):
    from edgevlm import load_model

    name = request.param
    model = tiny_model if tiny_model.cfg.integrator.name == name else load_model("tiny", integrator=name, **SMALL)
    model = model.float().eval()
    return model, _export(model, tmp_path_factory.mktemp(f"gguf-{name}") / "b", ["f16", "q4_0"])


def _embedding_cosine(model, bundle, **runtime_kw) -> float:
    """Smallest per-token cosine of mmproj's features vs model.encode_images (two images)."""
    import torch

    with _runtime(bundle, **runtime_kw) as rt:
        pixels = np.concatenate([rt.pixel_values(_image(s)) for s in (0, 1)])  # [2, 3, S, S]
        got = rt.backend.encode_image(pixels)
    with torch.inference_mode():
        want = model.encode_images(torch.from_numpy(pixels)).numpy()
    assert got.shape == want.shape == (2, model.n_visual_tokens, model.cfg.llm.hidden_size)
    cos = cosine(got, want)
    print(f"\n[{model.cfg.integrator.name}] per-token cosine min {cos.min():.6f} mean {cos.mean():.6f}, "
          f"max abs diff {np.abs(got - want).max():.2e} (|x| max {np.abs(want).max():.2f})")
    return float(cos.min())


def test_image_embeddings_match_torch(small_bundle):
    """mmproj features == model.encode_images: layer selection, CLS, norms, GELU, projector."""
    assert _embedding_cosine(*small_bundle) >= COS_MIN


def test_embedding_check_fails_on_a_damaged_mmproj(small_bundle, tmp_path):
    model, bundle = small_bundle
    b = copy_bundle(bundle, tmp_path)
    perturb_gguf_tensor(b / "mmproj-f16.gguf", "v.blk.0.ffn_down", rel=0.25)
    assert _embedding_cosine(model, b, verify=False) < COS_MIN


LOGIT_ATOL = 0.02  # f16 GGUF vs fp32 torch, image encoder included (measured: <= 0.0072 here)


def _parity(model, bundle, image, prompt, steps=12, **runtime_kw):
    """(comparison, llama.cpp's own greedy tokens) for one image and prompt, torch as the reference."""
    from edgevlm.model.torch_backend import TorchBackend

    with _runtime(bundle, **runtime_kw) as rt:
        ids, pixels = rt.processor(image, prompt)
        cmp = assert_parity(TorchBackend(model), rt.backend, ids, pixels, steps, LOGIT_ATOL)
        got = rt.generate(image, prompt, max_new_tokens=steps, ignore_eos=True).token_ids
    return cmp, got


def test_logits_and_greedy_tokens_match_torch(small_bundle):
    """Logits at every step; tokens while torch's top-1 margin is clear (near-ties may break either
    way on another CPU's kernels)."""
    model, bundle = small_bundle
    cmp, got = _parity(model, bundle, _image(3), "What shape is it?")
    assert_clear_tokens(got, cmp, LOGIT_ATOL)


def test_parity_check_fails_on_a_damaged_llm(small_bundle, tmp_path):
    """The same check on a copy whose LLM has one perturbed weight matrix (noise of 25% of its std)."""
    model, bundle = small_bundle
    b = copy_bundle(bundle, tmp_path)
    perturb_gguf_tensor(b / "llm-f16.gguf", "blk.0.ffn_down", rel=0.25)
    with pytest.raises(AssertionError, match="logits differ"):
        _parity(model, b, _image(3), "What shape is it?", verify=False)


def _cls_last_features(model, pixels):
    """What llama.cpp's llava graph computes with a class embedding (issue 25814): CLS appended
    after the patches, position rows added in order, rows 1..N read back, then the integrator."""
    import torch

    vm = model.vision_tower.vision_tower.vision_model
    emb = vm.embeddings
    with torch.inference_mode():
        x = torch.from_numpy(pixels)
        patches = emb.patch_embedding(x).flatten(2).transpose(1, 2)  # [B, N, D]
        cls = emb.class_embedding.expand(x.shape[0], 1, -1)
        h = vm.pre_layrnorm(torch.cat([patches, cls], 1) + emb.position_embedding.weight[None])
        for layer in vm.encoder.layers[: model.vision_tower.layers_used]:
            h = layer(h, None, None)[0]
        return model.integrator(h[:, 1:]).numpy()


def test_cls_keep_mode_meets_llama_cpps_cls_order(bundle, tiny_model, tmp_path):
    """Why the exporter omits CLS by default: with the class embedding in the file, this llama.cpp
    computes the CLS-last graph above, not the model. If a llama.cpp build matches torch here
    instead, its CLS order is fixed and ``--cls keep`` is the exact choice for it."""
    import torch

    from edgevlm.export.gguf_mmproj import write_mmproj

    b = copy_bundle(bundle, tmp_path)
    write_mmproj(tiny_model, b / "mmproj-f16.gguf", cls="keep")
    with _runtime(b, verify=False) as rt:
        pixels = rt.pixel_values(_image(4))
        got = rt.backend.encode_image(pixels)[0]
    with torch.inference_mode():
        want = tiny_model.encode_images(torch.from_numpy(pixels))[0].numpy()
    vs_torch = cosine(got, want).min()
    vs_cls_last = cosine(got, _cls_last_features(tiny_model, pixels)[0]).min()
    print(f"\n[cls=keep] per-token cosine min vs torch {vs_torch:.4f}, vs CLS-last graph {vs_cls_last:.6f}")
    assert vs_cls_last >= COS_MIN or vs_torch >= COS_MIN


# --- the interface --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tiny_model, tmp_path_factory):
    return _export(tiny_model.float().eval(), tmp_path_factory.mktemp("gguf") / "b", ["f16", "q4_0"])


def test_generate_stream_timings_and_quant_choice(bundle):
    with _runtime(bundle, quant="q4_0", max_context=512, n_gpu_layers=0) as rt:
        assert rt.backend.quant == "q4_0" and rt.backend.n_ctx == 512
        r = rt.generate(_image(), "What colour is it?", max_new_tokens=6, ignore_eos=True)
        assert len(r.token_ids) == 6 and r.finish_reason == "length"
        t = r.timings
        assert t.n_visual_tokens == rt.manifest.model.n_visual_tokens and t.vision_ms > 0
        assert t.prefill_ms > 0 and t.decode_tok_s > 0
        s = rt.stream(_image(), "What colour is it?", max_new_tokens=6, ignore_eos=True)
        pieces = list(s)
        assert "".join(pieces) == s.result.text == r.text  # greedy: same run twice
        text_only = rt.generate(None, "Say something.", max_new_tokens=3)
        assert 1 <= len(text_only.token_ids) <= 3


def test_unknown_quant_and_wrong_bundle_kind_are_refused(bundle, tmp_path):
    from edgevlm.runtime.manifest import read_manifest

    with pytest.raises(BundleError, match="no 'q5_k_m' LLM in this bundle; it has: f16, q4_0"):
        _runtime(bundle, quant="q5_k_m")
    with pytest.raises(EdgeVLMError, match="unknown llamacpp backend option.*n_threads; valid: threads"):
        _runtime(bundle, n_threads=2)  # the common option is ``threads`` on every backend
    m = read_manifest(bundle)
    m.target = "onnx"
    from edgevlm.runtime.backends.llamacpp import open_bundle

    with pytest.raises(BundleError, match="llamacpp backend runs GGUF bundles"):
        open_bundle(bundle, m)


def test_pixel_values_not_made_from_8bit_pixels_are_refused(bundle):
    with _runtime(bundle) as rt:
        pixels = rt.pixel_values(_image()) + 0.003
        with pytest.raises(EdgeVLMError, match="8-bit"):
            rt.backend.encode_image(pixels)


def test_llama_cpp_logs_belong_to_the_model_whose_call_made_them(bundle, capfd):
    """llama.cpp keeps one log callback per process; ``llamacpp_log`` routes each message to the
    instance whose call is running: one model's ``verbose`` does not print another's log, and each
    model's last error is its own (two models, f16 and q4_0, open side by side)."""
    with _runtime(bundle, quant="f16", verbose=True) as loud:
        assert "llama_model_loader" in capfd.readouterr().err  # its own load, printed
        with _runtime(bundle, quant="q4_0") as quiet:
            quiet.generate(_image(), "What colour is it?", max_new_tokens=2)
            err = capfd.readouterr().err
            assert "llama_model_loader" not in err and "llm-q4_0" not in err, err[-2000:]
            bad_quiet, bad_loud = quiet.backend.n_vocab + 7, loud.backend.n_vocab + 9
            for rt, bad in ((quiet, bad_quiet), (loud, bad_loud)):
                rt.backend.prefill([np.array([1, 2, 3], np.int64)])
                with pytest.raises(EdgeVLMError, match=f"llama_decode failed .*invalid token.*{bad}"):
                    rt.backend.decode(bad)
            err = capfd.readouterr().err
            assert f"= {bad_loud}" in err and f"= {bad_quiet}" not in err  # only the verbose model prints
            assert str(bad_quiet) in quiet.backend.log.last_error()
            loud_error = loud.backend.log.last_error()
            assert str(bad_loud) in loud_error and str(bad_quiet) not in loud_error
            quiet.generate(None, "Hello", max_new_tokens=1)  # a new call starts with no errors of its own
            assert quiet.backend.log.last_error() == "no details"


# --- bad files: clear errors before llama.cpp sees them --------------------------------------------


def test_truncated_llm_is_refused_before_llama_cpp(bundle, tmp_path):
    b = copy_bundle(bundle, tmp_path)
    data = (b / "llm-f16.gguf").read_bytes()
    (b / "llm-f16.gguf").write_bytes(data[: len(data) // 3])
    with pytest.raises(BundleError, match="truncated or altered"):
        _runtime(b)  # the manifest's sizes catch it first
    with pytest.raises(BundleError, match="truncated"):
        _runtime(b, verify=False)  # and the GGUF reader without them


def test_non_gguf_mmproj_is_refused(bundle, tmp_path):
    b = copy_bundle(bundle, tmp_path)
    (b / "mmproj-f16.gguf").write_bytes(b"PK\x03\x04 not a gguf file" * 10)
    with pytest.raises(BundleError, match="not a GGUF file"):
        _runtime(b, verify=False)


def test_mmproj_of_another_width_is_refused(bundle, tmp_path):
    from edgevlm import load_model
    from edgevlm.export.gguf_mmproj import write_mmproj

    b = copy_bundle(bundle, tmp_path)
    other = load_model("tiny", llm__hidden_size=128, **SMALL).float().eval()
    write_mmproj(other, b / "mmproj-f16.gguf")
    with pytest.raises(BundleError, match="projects images to width 128 but llm-f16.gguf has hidden size 256"):
        _runtime(b, verify=False)


# --- trained model: agreement and held-out accuracy per quant type -------------------------------


@pytest.fixture(scope="module")
def trained_bundle(trained_tiny, tmp_path_factory):
    from edgevlm.export.common import load_for_export

    model = load_for_export(str(trained_tiny))
    return model, _export(model, tmp_path_factory.mktemp("gguf-trained") / "b", QUANTS, source=str(trained_tiny))


@pytest.fixture(scope="module")
def heldout(trained_data):
    from edgevlm.train.evaluate import majority_answers

    records = split_records(trained_data, "test")[:N_HELDOUT]
    return records, majority_answers(split_records(trained_data, "train"))


def _answers(generate, records) -> dict[str, object]:
    from edgevlm.train.data.llava import load_record_image

    return {rec.id: generate(load_record_image(rec), rec.turns[0][0]) for rec in records}


@pytest.fixture(scope="module")
def fidelity(trained_bundle, heldout, tmp_path_factory):
    """Greedy answers of torch and of every quant type on the held-out records."""
    model, bundle = trained_bundle
    records, _ = heldout
    out = {"torch": _answers(lambda im, q: model.generate(im, q, max_new_tokens=12), records)}
    for q in QUANTS:
        with _runtime(bundle, quant=q) as rt:
            out[q] = _answers(lambda im, p: rt.generate(im, p, max_new_tokens=12), records)
    return out


def test_trained_image_embeddings_match_torch(trained_bundle, heldout):
    import torch

    from edgevlm.train.data.llava import load_record_image

    model, bundle = trained_bundle
    with _runtime(bundle) as rt:
        pixels = np.concatenate([rt.pixel_values(load_record_image(r)) for r in heldout[0][:4]])
        got = rt.backend.encode_image(pixels)
    with torch.inference_mode():
        want = model.encode_images(torch.from_numpy(pixels)).numpy()
    cos = cosine(got, want)
    print(f"\n[trained] per-token cosine min {cos.min():.6f} mean {cos.mean():.6f}, "
          f"max abs diff {np.abs(got - want).max():.2e} (|x| max {np.abs(want).max():.2f})")
    assert cos.min() >= COS_MIN


def test_f16_greedy_tokens_agree_with_torch(fidelity):
    ref, f16 = fidelity["torch"], fidelity["f16"]
    same = sum(ref[k].token_ids == f16[k].token_ids for k in ref)
    print(f"\n[trained] f16 greedy answers identical to torch: {same}/{len(ref)}")
    assert same >= 0.9 * len(ref)


def test_heldout_accuracy_per_quant_type(fidelity, heldout, tmp_path_factory):
    from edgevlm.train.evaluate import score

    records, majority = heldout
    results = {name: score(records, lambda rec, q, a=answers: a[rec.id].text, majority, progress=False)
               for name, answers in fidelity.items()}
    table = accuracy_table(results)
    print("\n" + table)
    (tmp_path_factory.getbasetemp() / "gguf_accuracy.json").write_text(json.dumps(results, indent=2))
    overall = {k: r["overall"]["accuracy"] for k, r in results.items()}
    assert abs(overall["f16"] - overall["torch"]) <= 0.03
    assert overall["f16"] - overall["q4_k_m"] <= 0.03, f"q4_k_m drop {overall['f16'] - overall['q4_k_m']:.3f}"


def accuracy_table(results: dict) -> str:
    """Rows: question types + overall; columns: torch and each quant type (accuracy)."""
    names = list(results)
    kinds = list(next(iter(results.values()))["per_type"]) + ["overall"]
    lines = [f"{'type':<12}{'n':>5}" + "".join(f"{n:>9}" for n in names) + f"{'majority':>10}"]
    for kind in kinds:
        rows = [r["overall"] if kind == "overall" else r["per_type"][kind] for r in results.values()]
        lines.append(f"{kind:<12}{rows[0]['n']:>5}" + "".join(f"{r['accuracy']:>9.3f}" for r in rows)
                     + f"{rows[0]['majority_baseline']:>10.3f}")
    return "\n".join(lines)
