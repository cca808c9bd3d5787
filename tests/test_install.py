"""Lean device installs, in clean venvs (issue 30).

The device extras ``[ort]``, ``[llamacpp]``, ``[serve]`` and ``[trt]`` resolve without torch,
transformers, peft or accelerate (edgevlm's requirements read from its built metadata, resolved by pip); a fresh venv with ``pip install -c constraints.txt -e ".[ort]"``
(and one with ``[llamacpp]``) runs ``edgevlm run`` on a bundle that this, the full, install exported,
with torch absent, picks the backend from the bundle, and answers what the full install answers.

pip resolves against PyPI (its HTTP cache after the first run); llama-cpp-python comes from pip's
wheel cache, which ``make install`` fills (with a cold cache the lean venv builds it once: minutes).
TensorRT's own package cannot be resolved without an NVIDIA driver, so ``[trt]`` is checked as
declared, and its other requirements are resolved.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")  # the bundles are exported by the full install running this test
from packaging.requirements import Requirement  # noqa: E402

from conftest import REPO  # noqa: E402
from llamacpp_tools import NO_AMX  # noqa: E402

HEAVY = {"torch", "transformers", "peft", "accelerate"}
CONSTRAINTS = REPO / "constraints.txt"
RUN_ARGS = ("--prompt", "What colour is the circle?", "--max-new-tokens", "4", "--threads", "1", "--json")
# torch's own CUDA runtime packages: PyPI's torch for x86-64 Linux pulls them, a local CPU wheel not
TORCH_CUDA_DEPS = re.compile(r"^(nvidia-.*|triton|cuda-.*)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def clean_env() -> dict:
    """This environment minus what would let a venv see this install's packages; llama-cpp-python,
    if a lean venv must build it, built as the Makefile builds it (without AMX)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    if NO_AMX and "CMAKE_ARGS" not in env:
        env["CMAKE_ARGS"] = f"-DCMAKE_C_FLAGS='{NO_AMX}' -DCMAKE_CXX_FLAGS='{NO_AMX}'"
    return env


def run(cmd: list, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                          env=clean_env(), **kw)


def check(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"{' '.join(p.args)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def make_venv(path: Path) -> Path:
    """A fresh venv (the interpreter's base Python, pip only); its python."""
    check(run([sys.executable, "-m", "venv", path]))
    return path / "bin" / "python"


def resolve(python: Path, report: Path, *requirements: str) -> dict[str, dict]:
    """What ``pip install -c constraints.txt <requirements>`` would install into an empty venv:
    canonical name -> the report's metadata (nothing is downloaded but metadata)."""
    check(run([python, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed", "--report", report,
               "-c", CONSTRAINTS, *requirements], cwd=REPO))
    return {canonical(i["metadata"]["name"]): i["metadata"] for i in json.loads(report.read_text())["install"]}


def installed(python: Path) -> set[str]:
    code = "import importlib.metadata as m; print('\\n'.join(d.metadata['Name'] for d in m.distributions()))"
    return {canonical(n) for n in check(run([python, "-c", code])).stdout.split()}


@pytest.fixture(scope="module")
def bare(tmp_path_factory) -> Path:
    return make_venv(tmp_path_factory.mktemp("bare") / "venv")


@pytest.fixture(scope="module")
def declared(bare, tmp_path_factory) -> dict[str, list[Requirement]]:
    """edgevlm's own requirements per extra ("" = install_requires), from its built metadata."""
    meta = resolve(bare, tmp_path_factory.mktemp("declared") / "report.json", ".")["edgevlm"]
    out: dict[str, list[Requirement]] = {}
    for req in map(Requirement, meta["requires_dist"]):
        for extra in re.findall(r'extra == "([^"]+)"', str(req.marker or "")) or [""]:
            out.setdefault(extra, []).append(req)
    return out


def names(reqs: list[Requirement]) -> set[str]:
    return {canonical(r.name) for r in reqs}


def plain(reqs: list[Requirement]) -> list[str]:
    """Requirements without their ``extra == ...`` markers, as pip reads ``.[extra]``."""
    return [f"{r.name}{'[' + ','.join(sorted(r.extras)) + ']' if r.extras else ''}{r.specifier}" for r in reqs]


def test_the_runtime_needs_only_its_four_libraries(declared):
    assert names(declared[""]) == {"numpy", "pillow", "tokenizers", "pyyaml"}


@pytest.mark.parametrize("extra, library", [("ort", "onnxruntime"), ("llamacpp", "llama-cpp-python"),
                                            ("serve", "uvicorn")])
def test_device_extra_resolves_without_torch(bare, tmp_path, declared, extra, library):
    got = resolve(bare, tmp_path / "report.json", *plain(declared[""] + declared[extra]))
    assert names(declared[extra]) <= set(got) and library in got  # the backend's library comes with it
    assert not set(got) & HEAVY, f"[{extra}] pulls {sorted(set(got) & HEAVY)}"


def test_trt_extra_is_lean(bare, tmp_path, declared):
    """TensorRT itself resolves only where NVIDIA's driver is (its sdist asks nvidia-smi); the rest is
    resolved here. On a Jetson the tensorrt module comes with JetPack (docs/jetson.md)."""
    assert "tensorrt" in names(declared["trt"]) and not names(declared["trt"]) & HEAVY
    others = [r for r in declared["trt"] if canonical(r.name) != "tensorrt"]
    got = resolve(bare, tmp_path / "report.json", *plain(declared[""] + others))
    assert names(declared["trt"]) - {"tensorrt"} <= set(got)
    assert not set(got) & HEAVY, f"[trt] pulls {sorted(set(got) & HEAVY)}"


def test_constraints_pin_everything_all_installs(bare, tmp_path, declared):
    """`make install` is reproducible: every package of ``.[all]`` is pinned in constraints.txt, and
    nothing is pinned that nothing installs (pip, setuptools and wheel: the Makefile's first step)."""
    got = resolve(bare, tmp_path / "report.json", *plain(declared[""] + declared["all"]))
    pins = {canonical(line.split("==")[0]) for line in CONSTRAINTS.read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    unpinned = {n for n in set(got) - pins if not TORCH_CUDA_DEPS.match(n)}
    assert not unpinned, f"constraints.txt does not pin {sorted(unpinned)}"
    assert not pins - set(got) - {"pip", "setuptools", "wheel"}, "pins for packages nothing installs"


# --- real lean installs running real bundles -----------------------------------------------------


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("lean_img") / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (180, 240, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def onnx_bundle(tiny_model, tmp_path_factory) -> Path:
    pytest.importorskip("onnx")
    from edgevlm.export.to_onnx import export_onnx

    return export_onnx(tiny_model, tmp_path_factory.mktemp("lean_onnx") / "b", exporter="torchscript",
                       progress=False)


@pytest.fixture(scope="module")
def gguf_bundle(tiny_model, tmp_path_factory) -> Path:
    pytest.importorskip("gguf")
    from edgevlm.export.to_gguf import export_gguf

    return export_gguf(tiny_model, tmp_path_factory.mktemp("lean_gguf") / "b", ["f16"], progress=False)


def answer(cmd: list, cwd: Path) -> dict:
    """The JSON line ``edgevlm run ... --json`` prints."""
    return json.loads(check(run(cmd, cwd=cwd)).stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("extra, bundle_fixture, backend", [("ort", "onnx_bundle", "ort"),
                                                            ("llamacpp", "gguf_bundle", "llamacpp")])
def test_lean_install_runs_a_bundle_without_torch(request, tmp_path, image, extra, bundle_fixture, backend):
    bundle = request.getfixturevalue(bundle_fixture)
    python = make_venv(tmp_path / "venv")
    check(run([python, "-m", "pip", "install", "-q", "-c", CONSTRAINTS, "-e", f".[{extra}]"], cwd=REPO,
              timeout=1800))
    assert not installed(python) & HEAVY
    p = run([python, "-c", "import torch"], cwd=tmp_path)
    assert p.returncode != 0 and "No module named 'torch'" in p.stderr

    # no --backend: the bundle's manifest says which backend reads it
    lean = answer([python.parent / "edgevlm", "run", "--bundle", bundle, "--image", image, *RUN_ARGS], tmp_path)
    full = answer([sys.executable, "-c", "import sys; from edgevlm.cli import main; sys.exit(main(sys.argv[1:]))",
                   "run", "--bundle", bundle, "--image", image, "--backend", backend, *RUN_ARGS], tmp_path)
    assert lean["token_ids"] and lean["token_ids"] == full["token_ids"]  # greedy: the full install's answer
