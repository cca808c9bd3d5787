"""The integrator study (benchmarks/study_integrators.py) end to end at toy scale: real training,
real eval, real benchmark cases (small preset instead of 1.7B), the joined report and charts."""
import json
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def study(trained_tiny, shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    cmd = [sys.executable, str(REPO / "benchmarks" / "study_integrators.py"), "--base", str(trained_tiny),
           "--data", str(shapes_dir), "--out", str(out), "--integrators", "linear,ldpv2", "--eval-records", "12",
           "--threads", "1", "--runs", "1", "--no-limits", "--latency-preset", "tiny",
           "--latency-override", "vision.num_hidden_layers=3", "--latency-override", "llm.num_hidden_layers=2",
           "stages.0.max_steps=1", "stages.0.batch_size=2", "stages.1.max_steps=1", "stages.1.batch_size=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, cmd


def test_study_joins_accuracy_cost_and_latency(study):
    out, _ = study
    doc = json.loads((out / "study.json").read_text())
    assert doc["paradigm"] == "two_stage"
    rows = {r["integrator"]: r for r in doc["integrators"]}
    assert set(rows) == {"linear", "ldpv2"}
    assert rows["linear"]["n_visual_tokens_1p7b"] == 576 and rows["ldpv2"]["n_visual_tokens_1p7b"] == 144
    assert rows["linear"]["integrator_params_1p7b"] == 2_099_200
    for r in rows.values():
        assert r["eval"]["overall"]["n"] == 12 and set(r["eval"]["per_type"]) <= {
            "colour", "shape", "count", "position", "existence", "text"}
        stages = [s["stage"] for s in r["stages"]]
        assert stages == ["pretrain", "instruct"]
        # stage 1 trains the integrator only: its trainable count is the integrator's size
        assert r["stages"][0]["trainable_by_group"] == {"integrator": r["integrator_params_tiny"]}
        assert r["stages"][1]["peak_rss_mb"] > 0
    lat = {c["integrator"]: c for c in doc["latency"]}
    assert set(lat) == {"linear", "ldpv2"} and all(c["status"] == "ok" for c in lat.values())
    assert lat["linear"]["n_visual_tokens"] == 576 and lat["ldpv2"]["n_visual_tokens"] == 144
    md = (out / "study.md").read_text()
    assert "| `linear` |" in md and "| `ldpv2` |" in md
    assert (out / "plots" / "study_pareto_torch_fp32.png").read_bytes()[:4] == b"\x89PNG"
    assert "![accuracy vs TTFT, torch fp32](plots/study_pareto_torch_fp32.png)" in md
    assert "<img" in (out / "study.html").read_text()


def test_benchmark_report_gains_the_study(study, tmp_path):
    out, _ = study
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "report.py"), str(out / "latency.jsonl"),
                           "--study", str(out / "study.json"), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## Integrator study: accuracy vs latency" in md and "| `ldpv2` |" in md
    assert (tmp_path / "r" / "plots" / "study_pareto_torch_fp32.png").is_file()
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "report.py"), str(out / "latency.jsonl"),
                           "--study", str(bad), "--out", str(tmp_path / "r2")], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 2 and "not a study.json" in proc.stderr


def test_study_rerun_reuses_trained_integrators(study):
    out, cmd = study
    before = {p: p.stat().st_mtime for p in out.glob("runs/*/result.json")}
    proc = subprocess.run(cmd + ["--latency", "none"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p: p.stat().st_mtime for p in out.glob("runs/*/result.json")} == before


def test_study_rejects_bad_arguments(tmp_path, trained_tiny, capsys):
    from edgevlm.cli import main

    for extra, message in ((["--integrators", "nope"], "unknown integrator"),
                           (["--paradigm", "three_stage"], "no such recipe"),
                           (["--kwargs", "vlora=7"], "expected NAME={key: value"),
                           (["--base", str(tmp_path)], "not a model dir")):
        args = ["--base", str(trained_tiny), *extra] if extra[0] != "--base" else extra
        assert main(["bench", "study", *args, "--out", str(tmp_path / "o")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
