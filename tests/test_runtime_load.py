"""``Runtime.load``: the backend comes from the bundle (ONNX -> ort, GGUF -> llamacpp, a model dir or
preset -> torch), a named backend that cannot read the bundle is refused with the one that can, and
one set of options (threads, verbose, max_context) means the same on every backend, each refusing
what it does not know. Real ONNX Runtime, llama.cpp and PyTorch on the small tiny model."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from edgevlm.runtime import Runtime  # noqa: E402
from edgevlm.runtime.backends import COMMON_OPTIONS, get_backend  # noqa: E402
from edgevlm.runtime.errors import BundleError, ContextLengthError, EdgeVLMError  # noqa: E402
from edgevlm.runtime.hostcpu import usable_cpus  # noqa: E402
from edgevlm.runtime.manifest import read_manifest  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory):
    from edgevlm.model.checkpoint import save_model

    return save_model(tiny_model, tmp_path_factory.mktemp("load") / "model")


@pytest.fixture(scope="module")
def onnx_bundle(tiny_model, tmp_path_factory):
    from edgevlm.export.to_onnx import export_onnx

    return export_onnx(tiny_model, tmp_path_factory.mktemp("load") / "onnx", exporter="torchscript",
                       progress=False, token_check=0)


@pytest.fixture(scope="module")
def gguf_bundle(tiny_model, tmp_path_factory):
    from conftest import tiny_gguf

    return tiny_gguf(tiny_model, tmp_path_factory.mktemp("load") / "gguf", ["f16"])


def _image():
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8))


# --- the backend from the bundle -------------------------------------------------------------------


@pytest.mark.parametrize("fixture, backend", [("onnx_bundle", "ort"), ("gguf_bundle", "llamacpp"),
                                              ("model_dir", "torch")])
def test_the_backend_comes_from_the_bundle(fixture, backend, request, tiny_model):
    path = request.getfixturevalue(fixture)
    with Runtime.load(path, threads=1) as rt:
        assert rt.backend.name == backend
        r = rt.generate(_image(), "What colour is it?", max_new_tokens=3, ignore_eos=True)
    assert len(r.token_ids) == 3 and r.timings.n_visual_tokens == tiny_model.n_visual_tokens


def test_a_preset_name_opens_with_torch():
    with Runtime.load("tiny", threads=1) as rt:
        assert rt.backend.name == "torch"


@pytest.mark.parametrize("fixture, wrong, right", [("onnx_bundle", "llamacpp", "ort"),
                                                   ("gguf_bundle", "ort", "llamacpp"),
                                                   ("onnx_bundle", "trt", "ort")])
def test_a_backend_that_cannot_read_the_bundle_is_refused_naming_the_one_that_can(fixture, wrong, right, request):
    path = request.getfixturevalue(fixture)
    with pytest.raises(EdgeVLMError, match=f"the {wrong} backend cannot read it \\(backend='{right}' does"):
        Runtime.load(path, backend=wrong)


def test_a_model_dir_with_a_bundle_backend_is_refused(model_dir):
    with pytest.raises(BundleError, match="not a bundle .*the ort backend reads bundles.*backend='torch'"):
        Runtime.load(model_dir, backend="ort")


def test_a_path_that_is_neither_says_so(tmp_path):
    with pytest.raises(BundleError, match="not a bundle .*as a model dir or preset \\(torch backend\\)"):
        Runtime.load(tmp_path / "nothing-here")
    with pytest.raises(EdgeVLMError, match="unknown backend 'nope'; valid: executorch, llamacpp, ort, torch, trt"):
        Runtime.load(tmp_path, backend="nope")


# --- one set of options ----------------------------------------------------------------------------


@pytest.mark.parametrize("fixture, backend", [("onnx_bundle", "ort"), ("gguf_bundle", "llamacpp"),
                                              ("model_dir", "torch"), ("onnx_bundle", "trt")])
def test_every_backend_refuses_an_unknown_option_listing_the_valid_ones(fixture, backend, request):
    path = request.getfixturevalue(fixture)
    opener = get_backend(backend)
    manifest = read_manifest(path) if (path / "manifest.json").is_file() else None
    with pytest.raises(EdgeVLMError, match=f"unknown {backend} backend option\\(s\\) bogus; valid: "
                                           + ", ".join(COMMON_OPTIONS)):
        if backend == "torch":
            Runtime.load(path, backend="torch", bogus=1)
        else:  # the factory itself, before any library is needed (TensorRT is not installed here)
            opener(path, manifest, bogus=1)


def test_the_old_per_backend_thread_names_are_refused(gguf_bundle, onnx_bundle):
    with pytest.raises(EdgeVLMError, match="unknown llamacpp backend option\\(s\\) n_threads; valid: threads"):
        Runtime.load(gguf_bundle, n_threads=1)
    with pytest.raises(EdgeVLMError, match="unknown ort backend option\\(s\\) n_ctx"):
        Runtime.load(onnx_bundle, n_ctx=64)


def _threads(rt) -> int:
    """The thread count the backend's library was given."""
    if rt.backend.name == "ort":
        counts = {s.get_session_options().intra_op_num_threads for s in rt.backend.sessions.values()}
        assert len(counts) == 1
        return counts.pop()
    if rt.backend.name == "llamacpp":
        return rt.backend.lib.llama_n_threads(rt.backend._ctx)
    import torch

    return torch.get_num_threads()


@pytest.mark.parametrize("fixture", ["onnx_bundle", "gguf_bundle", "model_dir"])
def test_threads_maps_onto_each_backend_and_zero_means_every_core(fixture, request):
    path = request.getfixturevalue(fixture)
    import torch

    before = torch.get_num_threads()
    try:
        for given, expected in ((1, 1), (0, usable_cpus()), (None, usable_cpus())):
            with Runtime.load(path, **({} if given is None else {"threads": given})) as rt:
                assert _threads(rt) == expected, (given, rt.backend.name)
        with pytest.raises(EdgeVLMError, match="threads must be an integer >= 0"):
            Runtime.load(path, threads=-1)
    finally:
        torch.set_num_threads(before)  # torch's pool is process-wide


@pytest.mark.parametrize("fixture", ["onnx_bundle", "gguf_bundle", "model_dir"])
def test_max_context_bounds_the_sequence_on_every_backend(fixture, request, tiny_model):
    path = request.getfixturevalue(fixture)
    n_vis = tiny_model.n_visual_tokens
    with Runtime.load(path, threads=1, max_context=n_vis + 40) as rt:
        assert rt.backend.n_ctx == n_vis + 40
        r = rt.generate(_image(), "What colour is it?", max_new_tokens=500, ignore_eos=True)
        assert r.timings.n_visual_tokens + r.timings.n_prompt_tokens + len(r.token_ids) <= n_vis + 40
        with pytest.raises(ContextLengthError, match=f"context is {n_vis + 40} positions"):
            rt.generate(_image(), "colour " * 60, max_new_tokens=1)
    limit = tiny_model.cfg.llm.max_position_embeddings
    with pytest.raises(EdgeVLMError, match=f"max_context {limit + 1} exceeds the {limit} positions"):
        Runtime.load(path, threads=1, max_context=limit + 1)


def test_verbose_is_taken_by_every_backend(onnx_bundle, model_dir):
    for path in (onnx_bundle, model_dir):
        with Runtime.load(path, threads=1, verbose=True) as rt:
            assert rt.generate(None, "Hello", max_new_tokens=1).token_ids


def test_the_cli_passes_its_runtime_flags_to_the_bundles_backend(gguf_bundle, capsys):
    import json

    from edgevlm.cli import main

    argv = ["run", "--bundle", str(gguf_bundle), "--prompt", "Hello", "--max-new-tokens", "2", "--json"]
    assert main([*argv, "--threads", "1", "--quant", "f16", "--max-context", "64"]) == 0
    assert json.loads(capsys.readouterr().out)["timings"]["n_generated"] >= 1
    assert main([*argv, "--providers", "cuda"]) == 2  # an ort option on a GGUF bundle
    assert "unknown llamacpp backend option(s) providers; valid: threads" in capsys.readouterr().err
