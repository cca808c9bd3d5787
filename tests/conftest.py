"""Shared fixtures: tiny data and models built once per test session (no downloads)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tests never touch the user's cache; the preset tokenizer is rebuilt (deterministically) per session.
os.environ.setdefault("EDGEVLM_CACHE", str(Path(os.environ.get("PYTEST_CACHE_DIR", "/tmp")) / "edgevlm-test-cache"))

# A small tiny-preset variant: same 24x24 grid (llama.cpp's LDP constraint), fewer layers.
SMALL = dict(vision__num_hidden_layers=3, llm__num_hidden_layers=2)


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


def copy_bundle(bundle: Path, tmp_path: Path) -> Path:
    """A writable copy of a session-scoped bundle, for tests that damage files."""
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(bundle, dst)
    return dst
