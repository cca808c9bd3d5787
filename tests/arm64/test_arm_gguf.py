"""llama.cpp's kernels on every Arm class (``make test-arm64``): a GGUF bundle of the random tiny
model (f16, q8_0, q4_k_m) exported here on x86, run under qemu-user by llama-cpp-python's Python layer
over llama.cpp cross-compiled for the class's Arm level (tests/arm64/cross_llamacpp.py: armv8-a on
cortex-a57, armv8.2-a+dotprod on neoverse-n1 and max), compared with the x86 llama.cpp teacher-forced.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

if not os.environ.get(harness.FULL_ENV):
    pytest.skip("the full Arm64 suite runs with `make test-arm64`", allow_module_level=True)
pytest.importorskip("torch")

STEPS = 6
QUANTS = ("f16", "q8_0", "q4_k_m")


@pytest.fixture(scope="module")
def gguf_bundle(tiny_model, tmp_path_factory):
    from conftest import tiny_gguf

    return tiny_gguf(tiny_model, tmp_path_factory.mktemp("arm64_gguf") / "b", list(QUANTS))


@pytest.mark.parametrize("cls", list(harness.emulate.CLASSES))
def test_gguf_quants_match_x86_on_arm_class(cls, gguf_bundle, shapes_dir, tmp_path):
    env_root = harness.env_for_tests()
    lib = harness.llama_lib_for_tests(harness.emulate.CLASSES[cls].level)
    bundles = {q: (gguf_bundle, {"quant": q}) for q in QUANTS}
    results = harness.arm_vs_x86(env_root, cls, bundles, harness.cases(shapes_dir), STEPS, tmp_path, llama_lib=lib)
    print()
    misses = harness.report("llamacpp", cls, results)
    harness.record(cls, "llamacpp", results)
    assert {m["cpu_class"] for m in results.values()} == {cls}
    assert misses == {q: [] for q in QUANTS}
