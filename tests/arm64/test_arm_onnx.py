"""ONNX Runtime's kernels on every Arm class (``make test-arm64``): fp32, fp16, int8 in every
``--int8-target`` format and int4 bundles of the random tiny model, exported here on x86, run by the
aarch64 runtime under qemu-user per class and compared with x86 teacher-forced (tests/arm64/parity.py:
logits within the precision's tolerance, same top token where x86's margin is clear, mean KL, vision
cosine, tokenizer and preprocessing parity). One emulated process per class runs every bundle.
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
# Measured misses (docs/arm64.md): on qemu's `max` (SVE + i8mm) the two int8 formats with signed
# weights (u8 x s8 MatMulInteger) differ from x86 by ~1.2 logits (mean KL 0.05); with `max,sve=off`
# they match. ONNX Runtime's SVE int8 path or qemu's SVE emulation: unresolved without an SVE
# machine. Asserted as misses, so a change either way fails here and the docs get updated.
KNOWN_MISSES = {("arm64-i8mm", "int8_reduce-range"), ("arm64-i8mm", "int8_vnni")}
# bundle name (= precision label of benchmarks/fidelity.TARGETS) -> (dtype, quantize, int8 format)
VARIANTS = {"fp32": ("fp32", "none", "portable"), "fp16": ("fp16", "none", "portable"),
            "int8": ("fp32", "int8", "portable"), "int8_reduce-range": ("fp32", "int8", "reduce-range"),
            "int8_vnni": ("fp32", "int8", "vnni"), "int4": ("fp32", "int4", "portable")}


@pytest.fixture(scope="module")
def onnx_bundles(tiny_model, shapes_dir, tmp_path_factory):
    from edgevlm.export.to_onnx import export_fp32_graphs, export_onnx

    root = tmp_path_factory.mktemp("arm64_onnx")
    graphs = export_fp32_graphs(tiny_model, root / "graphs", exporter="torchscript")
    return {name: export_onnx(tiny_model, root / name, dt, q, exporter="torchscript", calib_data=str(shapes_dir),
                              calib_count=8, fp32_graphs=graphs, progress=False, token_check=0, int8_target=fmt)
            for name, (dt, q, fmt) in VARIANTS.items()}


@pytest.mark.parametrize("cls", list(harness.emulate.CLASSES))
def test_onnx_bundles_match_x86_on_arm_class(cls, onnx_bundles, shapes_dir, tmp_path):
    env_root = harness.env_for_tests()
    results = harness.arm_vs_x86(env_root, cls, onnx_bundles, harness.cases(shapes_dir), STEPS, tmp_path)
    print()
    misses = harness.report("ort", cls, results)
    harness.record(cls, "ort", results)
    assert {m["cpu_class"] for m in results.values()} == {cls}  # runtime.hostcpu on the emulated CPU
    assert {n for n, m in misses.items() if m} == {n for c, n in KNOWN_MISSES if c == cls}
