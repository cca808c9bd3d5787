"""The on-target benchmark flow (``make test-arm64``): bundles exported here on x86 are timed by
``edgevlm bench-target`` on the host and under the emulated Arm CPU (the lean runtime: no torch, no
benchmarks/ package there), and ``benchmarks/report.py`` merges both files into one report whose Arm
rows are measured on the target, not projected. The emulated timings mean nothing (qemu) and are
labelled so in the records and the report; only the machinery is checked.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

if not os.environ.get(harness.FULL_ENV):
    pytest.skip("the full Arm64 suite runs with `make test-arm64`", allow_module_level=True)
pytest.importorskip("torch")

CLASS = "arm64-dotprod"
NOTE = "emulated under qemu-user: timings meaningless"
ARGS = ["--runs", "1", "--warmup", "0", "--new-tokens", "3", "--threads", "1", "--prompt", "How many shapes?"]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_bundles_timed_on_emulated_arm_merge_with_host_records(tiny_model, shapes_dir, tmp_path):
    from edgevlm.benchmarks.report import write_report
    from edgevlm.export.to_onnx import export_onnx

    bundle = export_onnx(tiny_model, tmp_path / "int8", "fp32", "int8", exporter="torchscript", progress=False,
                         token_check=0)
    image = str(shapes_dir / "images" / "test_000000.png")
    host, device = tmp_path / "host.jsonl", tmp_path / "device.jsonl"
    subprocess.run([sys.executable, "-m", "edgevlm.cli", "bench-target", "--bundle", str(bundle), "--image", image,
                    "--out", str(host), *ARGS], check=True, capture_output=True)
    harness.emulate.run(harness.env_for_tests(), CLASS, [
        "-m", "edgevlm.cli", "bench-target", "--bundle", str(bundle), "--image", image, "--out", str(device),
        "--note", NOTE, *ARGS])

    env, case = _records(device)
    assert env["type"] == "environment" and env["machine"] == "aarch64" and env["cpu_class"] == CLASS
    assert "torch" not in env["libraries"] and env["note"] == NOTE
    assert case["measured_on"] == "target" and case["device"] == CLASS and case["precision"] == "int8"
    assert case["metrics"]["ttft_ms"]["n"] == 1 and case["n_generated"] == 3

    report = write_report([str(host), str(device)], tmp_path / "report") / "report.md"
    text = report.read_text()
    host_class = _records(host)[0]["cpu_class"]
    assert f"ort int8 @{CLASS}" in text and f"ort int8 @{host_class}" in text  # both rows, told apart
    assert NOTE in text and f"target device ({CLASS})" in text
