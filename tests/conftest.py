"""Shared fixtures: tiny data and models built once per test session (no downloads)."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tests never touch the user's cache, nor one left by an earlier run or another checkout: a fresh
# directory per session (the preset tokenizer is rebuilt deterministically, benchmark exports anew).
if "EDGEVLM_CACHE" not in os.environ:
    os.environ["EDGEVLM_CACHE"] = tempfile.mkdtemp(prefix="edgevlm-test-cache-")
    atexit.register(shutil.rmtree, os.environ["EDGEVLM_CACHE"], ignore_errors=True)

# A small tiny-preset variant: same 24x24 grid (llama.cpp's LDP constraint), fewer layers.
SMALL = dict(vision__num_hidden_layers=3, llm__num_hidden_layers=2)
HEADER_LIBRARIES = ("numpy", "torch", "transformers", "onnx", "onnxruntime", "llama_cpp_python", "gguf",
                    "coremltools", "tokenizers")


def pytest_report_header(config):
    """Where the suite ran: a failure report is only useful with the CPU class and library versions."""
    import importlib.metadata
    import platform

    from edgevlm.runtime.hostcpu import cpu_class, cpu_flags

    versions = []
    for name in HEADER_LIBRARIES:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} -")
    threads = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_CORETYPE") if k in os.environ}
    return [f"cpu: {cpu_class()} ({platform.machine()}, {os.cpu_count()} cores) flags: {' '.join(cpu_flags()) or '-'}"
            + (f" env: {threads}" if threads else ""),
            "libraries: " + ", ".join(versions)]


def split_records(folder: Path, split: str) -> list:
    """The VQARecords of ``folder/{split}.json`` (a generated ShapesVQA folder)."""
    from edgevlm.train.data.llava import load_llava_records

    return load_llava_records(str(folder / f"{split}.json")).records


def importorskip_torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    from edgevlm.train.data.shapes import generate_shapes_vqa

    out = tmp_path_factory.mktemp("shapes")
    generate_shapes_vqa(str(out), n_train=48, n_val=12, n_test=36, seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_model():
    from edgevlm import load_model

    return load_model("tiny", **SMALL)


@pytest.fixture(scope="session")
def trained_data(tmp_path_factory) -> Path:
    """A larger ShapesVQA draw for the trained fixture model and held-out accuracy checks."""
    from edgevlm.train.data.shapes import generate_shapes_vqa

    out = tmp_path_factory.mktemp("shapes_trained")
    generate_shapes_vqa(str(out), n_train=600, n_val=12, n_test=120, seed=1, progress=False)
    return out


@pytest.fixture(scope="session")
def trained_tiny(trained_data, tmp_path_factory) -> Path:
    """A tiny model trained here for a couple of minutes (exports are compared on its answers).

    Returns the model directory. It answers colour/existence questions well above chance, which is
    what the export fidelity tests need; it is not the demo model.
    """
    from edgevlm.train.loop import run
    from edgevlm.train.recipe import StageConfig, TrainConfig

    out = tmp_path_factory.mktemp("trained")
    every = ["vision_tower", "integrator", "llm"]
    cfg = TrainConfig(model="tiny", model_overrides=dict(SMALL), output_dir=str(out), stages=[
        StageConfig(name="pretrain", data=str(trained_data / "captions.json"), template="plain", train=every,
                    lr=1e-3, max_steps=15, batch_size=8, log_every=1000),
        StageConfig(name="instruct", data=str(trained_data / "train.json"), train=every, lr=1e-3,
                    max_steps=TRAINED_STEPS, batch_size=8, log_every=1000),
    ])
    return run(cfg)


TRAINED_STEPS = 120


def tiny_gguf(model, out: Path, quants: list[str]) -> Path:
    """A GGUF bundle of ``model`` (skips where gguf or llama-cpp-python is missing)."""
    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    from edgevlm.export.to_gguf import export_gguf

    return export_gguf(model.float().eval(), out, quants, progress=False, token_check=0)


def copy_bundle(bundle: Path, tmp_path: Path) -> Path:
    """A writable copy of a session-scoped bundle, for tests that damage files."""
    dst = tmp_path / "copy"
    shutil.copytree(bundle, dst)
    return dst


# --- parity: logits everywhere, tokens where the reference's margin is clear ------------------------


def assert_parity(ref, target, prompt_ids, pixels, steps: int, atol: float):
    """``runtime.fidelity.compare_greedy`` of two backends; fails on any logit difference over
    ``atol`` and on a different top token where the reference's margin is clear. Returns the
    comparison (its ``tokens`` are the reference's greedy run)."""
    from edgevlm.runtime.fidelity import compare_greedy

    cmp = compare_greedy(ref, target, prompt_ids, pixels, steps)
    problems = cmp.problems(atol)
    print(f"\n  parity: max |logit diff| {cmp.max_abs.max():.3g} (atol {atol}), smallest reference margin "
          f"{cmp.margin.min():.3g}, clear steps {int(cmp.clear(atol).sum())}/{steps}")
    assert not problems, problems
    return cmp


def assert_clear_tokens(got: list[int], cmp, atol: float) -> None:
    """A target's own greedy run equals the reference's up to the first step whose margin is not clear."""
    k = cmp.clear_prefix(atol)
    assert got[:k] == cmp.tokens[:k], f"greedy tokens differ within the first {k} clear steps"


def perturb_onnx_weight(path: Path, rel: float = 0.05, seed: int = 0) -> str:
    """Noise of ``rel`` x its std on the largest MatMul weight of an ONNX file (in place)."""
    from edgevlm.benchmarks.export_noise import perturb_largest_weight

    return perturb_largest_weight(path, rel, seed)


def perturb_gguf_tensor(path: Path, name_part: str, rel: float = 0.05, seed: int = 0) -> str:
    """Damage an F16/F32 tensor of a GGUF file in place (noise of ``rel`` x its std). Returns its name."""
    import numpy as np
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r+")
    t = next(t for t in reader.tensors if name_part in t.name and t.data.dtype in (np.float16, np.float32))
    w = t.data.astype(np.float32)
    t.data[...] = (w + np.random.default_rng(seed).standard_normal(w.shape) * rel * w.std()).astype(t.data.dtype)
    reader.data.flush()  # the reader's np.memmap of the file
    return t.name


# --- edgevlm serve (test_serve*.py): the small model's bundles, exported once per session ---------------


@pytest.fixture(scope="session")
def serve_model():
    importorskip_torch()
    from edgevlm import load_model

    return load_model("tiny", **SMALL).float().eval()


@pytest.fixture(scope="session")
def serve_onnx_bundle(serve_model, tmp_path_factory) -> Path:
    from edgevlm.export.to_onnx import export_onnx

    return export_onnx(serve_model, tmp_path_factory.mktemp("serve_onnx") / "b", exporter="torchscript",
                       token_check=0, progress=False)


@pytest.fixture(scope="session")
def serve_gguf_bundle(serve_model, tmp_path_factory) -> Path:
    return tiny_gguf(serve_model, tmp_path_factory.mktemp("serve_gguf") / "b", ["f16"])
