"""Arm64 smoke test (the default suite): ONNX fp32 and int8 bundles of the random tiny model, exported
here on x86, run by the torch-free runtime's aarch64 build under qemu-user as a dot-product Arm CPU
(neoverse-n1), compared with x86 teacher-forced; and one weight matrix of the fp32 bundle perturbed
(as if damaged on its way to the device) fails the comparison. The rest of the Arm matrix (every
target, format and Arm class, llama.cpp) runs with ``make test-arm64`` (tests/arm64/).

Builds the Arm environment on first use (about a minute of Debian/PyPI downloads, cached under
~/.cache/edgevlm/arm64); ``EDGEVLM_SKIP_ARM=1`` skips it where it is not built. Emulation measures
correctness only: nothing here is timed.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")  # the bundles are exported here, on x86
sys.path.insert(0, str(Path(__file__).resolve().parent / "arm64"))
import harness  # noqa: E402

from conftest import perturb_onnx_weight  # noqa: E402

CLASS = "arm64-dotprod"
STEPS = 4


@pytest.fixture(scope="module")
def arm_env():
    """Built (or its one-line failure, or the opt-out's skip) before anything is exported."""
    return harness.env_for_tests()


@pytest.fixture(scope="module")
def smoke_bundles(tiny_model, shapes_dir, tmp_path_factory):
    from edgevlm.export.to_onnx import export_fp32_graphs, export_onnx

    root = tmp_path_factory.mktemp("arm64_smoke")
    graphs = export_fp32_graphs(tiny_model, root / "graphs", exporter="torchscript")
    out = {name: export_onnx(tiny_model, root / name, "fp32", q, exporter="torchscript", calib_data=str(shapes_dir),
                             calib_count=4, fp32_graphs=graphs, progress=False, token_check=0)
           for name, q in (("fp32", "none"), ("int8", "int8"))}
    damaged = root / "damaged"
    shutil.copytree(out["fp32"], damaged)
    perturb_onnx_weight(damaged / "decoder_model_merged.onnx")
    return out, damaged


def test_onnx_bundles_on_emulated_arm_match_x86_and_a_damaged_one_does_not(arm_env, smoke_bundles, shapes_dir,
                                                                          tmp_path):
    env_root = arm_env
    bundles, damaged = smoke_bundles
    cases = harness.cases(shapes_dir, n_images=1)[:1]
    # the manifest's sha256 would refuse the damaged file at load: read it unverified, to test the comparison
    results = harness.arm_vs_x86(env_root, CLASS, {**bundles, "damaged": (damaged, {"verify": False})}, cases, STEPS, tmp_path,
                                 reference_bundles={**bundles, "damaged": bundles["fp32"]})
    print()
    misses = harness.report("ort", CLASS, {k: results[k] for k in bundles})
    assert all(m["cpu_class"] == CLASS for m in results.values())  # runtime.hostcpu on the emulated CPU
    assert misses == {name: [] for name in bundles}
    damaged_misses = harness.parity.goal_misses("ort", "fp32", results["damaged"])
    print(f"  damaged fp32 (one decoder weight +5% noise) vs x86's intact fp32: {damaged_misses}")
    assert any("logits differ" in m for m in damaged_misses)
