"""``edgevlm bench-target``: the on-device benchmark (runtime/bench_target.py) on this host, its
records read by ``benchmarks/report.py``, and its refusals. The emulated-Arm flow (host + device
records merged) is tests/arm64/test_arm_bench_flow.py (``make test-arm64``). Timings are not judged.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")  # the bundle is exported here


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgevlm.cli", "bench-target", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def int4_bundle(tiny_model, shapes_dir, tmp_path_factory):
    from edgevlm.export.to_onnx import export_onnx

    return export_onnx(tiny_model, tmp_path_factory.mktemp("bench_target") / "b", "fp32", "int4",
                       exporter="torchscript", calib_data=str(shapes_dir), calib_count=4, progress=False, token_check=0)


def test_records_follow_run_py_and_render_in_the_report(int4_bundle, tmp_path):
    from edgevlm.benchmarks.report import write_report
    from edgevlm.runtime.hostcpu import cpu_class

    out = tmp_path / "device.jsonl"
    p = _bench("--bundle", str(int4_bundle), "--out", str(out), "--runs", "2", "--warmup", "0", "--new-tokens", "3",
               "--threads", "1")
    assert p.returncode == 0, p.stderr
    env, case = [json.loads(line) for line in out.read_text().splitlines()]
    assert env["type"] == "environment" and env["measured_on"] == "target" and env["cpu_class"] == cpu_class()
    assert case["type"] == "case" and case["env_id"] == env["env_id"] and case["precision"] == "int4"
    assert case["backend"] == "ort" and case["n_generated"] == 3 and case["metrics"]["ttft_ms"]["n"] == 2
    text = (write_report([str(out)], tmp_path / "report") / "report.md").read_text()
    assert f"ort int4 @{cpu_class()}" in text and "measured on the target device itself" in text


@pytest.mark.parametrize("args, message", [
    (["--runs", "0"], "--runs must be >= 1"),
    (["--new-tokens", "1"], "--new-tokens >= 2"),
])
def test_bad_arguments_are_one_line(int4_bundle, tmp_path, args, message):
    p = _bench("--bundle", str(int4_bundle), "--out", str(tmp_path / "x.jsonl"), *args)
    assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_not_a_bundle_is_refused(tmp_path):
    p = _bench("--bundle", str(tmp_path), "--out", str(tmp_path / "x.jsonl"))
    assert p.returncode == 2 and "not a bundle" in p.stderr
