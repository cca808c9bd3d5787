"""The benchmark suite: matrix expansion, analytic costs against the real modules, the smoke
matrix run end to end in subprocesses (results schema, peers, resume, failures recorded) and the
report rendered from it. Nothing here asserts a timing."""
from __future__ import annotations

import base64
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from conftest import REPO, SMALL

from edgevlm.benchmarks import matrix as mx
from edgevlm.runtime.errors import EdgeVLMError

RUN = [sys.executable, str(REPO / "benchmarks" / "run.py")]
STAT_KEYS = {"median", "p10", "p90", "n", "values"}


def _run(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([*RUN, *args], capture_output=True, text=True, cwd=str(cwd), timeout=timeout)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- matrices -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["smoke", "integrators", "quant"])
def test_shipped_matrices_expand_to_unique_ids(name):
    cases = mx.expand(mx.load_matrix(name))
    assert cases and len({c["id"] for c in cases}) == len(cases)
    for c in cases:
        assert c["skip"] is None or isinstance(c["skip"], str)
        assert (c["export"] is None) == (c["backend"] in ("torch", "hf_eager"))


def test_integrators_matrix_covers_every_registered_integrator():
    from edgevlm.model.integrators import INTEGRATORS

    cases = mx.expand(mx.load_matrix("integrators"))
    assert {c["integrator"] for c in cases} == set(INTEGRATORS.names())
    assert {c["backend"] for c in cases} >= {"torch", "ort", "llamacpp", "trt", "hf_eager", "llamacpp_raw"}


def test_matrix_errors_and_filters(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"models": [{"preset": "tiny"}], "backends": {"torch": ["int3"]}}))
    with pytest.raises(EdgeVLMError, match="unknown precision"):
        mx.expand(mx.load_matrix(str(bad)))
    with pytest.raises(EdgeVLMError, match="not found"):
        mx.load_matrix("no-such-matrix")
    m = {"models": [{"preset": "tiny", "backends": ["torch"]}, {"dir": str(tmp_path / "missing"), "optional": True}],
         "backends": {"torch": ["fp32"], "llamacpp": ["q4_k_m"]}, "threads": [1, 2]}
    cases = mx.expand(m)
    assert [c["backend"] for c in cases if c["model"]["label"] == "tiny"] == ["torch", "torch"]
    assert all("does not exist" in c["skip"] for c in cases if c["model"]["source"] == "dir")
    assert [c["workload"]["threads"] for c in mx.select(cases, ["tiny/", "t2-"])] == [2]
    assert not mx.select(cases, ["tiny/", "!torch"])


def test_export_key_follows_what_the_export_depends_on():
    cases = {c["id"]: c for c in mx.expand(mx.load_matrix("quant"))}
    keys = {i: mx.export_key(c) for i, c in cases.items()}
    assert keys["mobilevlm-1.7b/ldp/torch/fp32/t0-i1-p32-n32"] is None
    q4 = "mobilevlm-1.7b/ldp/llamacpp/q4_k_m/t0-i1-p32-n32"
    assert keys[q4] == keys[q4.replace("llamacpp/", "llamacpp_raw/")]  # the raw peer reads the same GGUF
    assert keys[q4] != keys[q4.replace("q4_k_m", "q8_0")]
    assert keys[q4] == mx.export_key(dict(cases[q4]))  # stable


def test_bench_command_lists_cases(capsys):
    import argparse

    from edgevlm.benchmarks import cli
    from edgevlm.runtime.subcommands import run_command

    parser = argparse.ArgumentParser(prog="edgevlm bench")
    cli.add_arguments(parser)
    args = parser.parse_args(["run", "--matrix", "smoke", "--out", "unused.jsonl", "--list"])
    assert run_command(args) == 0
    assert "tiny-small/ldpv2/torch/fp32/t1-i1-p16-n8" in capsys.readouterr().out


# --- analytic costs against the real modules -----------------------------------------------------


@pytest.fixture(scope="module")
def small_shape(tiny_model):
    from edgevlm.benchmarks.flops import model_shape

    return model_shape(tiny_model)


def test_analytic_parameter_counts_match_the_model(tiny_model, small_shape):
    from edgevlm.benchmarks.flops import llm_params, vision_cost

    p = llm_params(small_shape["llm"])
    assert p["layers"] + p["head"] + p["embed"] == sum(x.numel() for x in tiny_model.llm.parameters())
    used = sum(x.numel() for x in tiny_model.vision_tower.used_parameters())
    assert vision_cost(small_shape["vision"])["params"] == used
    assert small_shape["integrator"]["params"] == sum(x.numel() for x in tiny_model.integrator.parameters())
    assert small_shape["integrator"]["n_visual_tokens"] == tiny_model.n_visual_tokens


def test_integrator_costs_cover_the_registry():
    from edgevlm.benchmarks.flops import preset_shape
    from edgevlm.model.integrators import INTEGRATORS
    from edgevlm.model.integrators.base import placement

    for name in INTEGRATORS.names():
        shape = preset_shape("tiny", integrator=name)
        assert shape["integrator"]["flops"] > 0, name  # vlora / gated_prefix: their per-image weights
        if placement(INTEGRATORS.get(name)) == "tokens":
            assert shape["integrator"]["n_visual_tokens"] > 0, name


def test_stage_costs_scale_with_precision_and_context(small_shape):
    from edgevlm.benchmarks.flops import stage_costs

    q4, f16, f32 = (stage_costs(small_shape, p, n_text=16, n_new=8) for p in ("q4_k_m", "f16", "fp32"))
    assert q4["decode"]["bytes_per_token"] < f16["decode"]["bytes_per_token"] < f32["decode"]["bytes_per_token"]
    assert q4["decode"]["flops_per_token"] == f32["decode"]["flops_per_token"]
    longer = stage_costs(small_shape, "fp32", n_text=64, n_new=8)
    assert longer["prefill"]["flops"] > f32["prefill"]["flops"] and longer["kv_cache_bytes"] > f32["kv_cache_bytes"]
    two = stage_costs(small_shape, "fp32", n_images=2, n_text=16, n_new=8)
    assert two["vision"]["flops"] == 2 * f32["vision"]["flops"]


def test_bandwidth_and_environment_measure_something():
    from edgevlm.benchmarks.bandwidth import measure_read_bandwidth
    from edgevlm.benchmarks.environment import collect

    bw = measure_read_bandwidth(size_mb=64, repeats=1, max_threads=1)
    assert bw["read_gbs"] > 0 and set(bw["by_threads"]) == {1}
    env = collect(measure_limits=False)
    assert env["type"] == "environment" and env["cores"]["logical"] >= 1 and env["ram_gb"] > 0
    assert "numpy" in env["libraries"] and len(env["env_id"]) == 12


# --- the smoke matrix, end to end ----------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("smoke")
    out = _run("--matrix", "smoke", "--out", "results.jsonl", cwd=work)
    assert out.returncode == 0, out.stderr[-3000:]
    return work / "results.jsonl"


@pytest.mark.slow  # runs the smoke matrix (about a minute on 2 cores, exports cached)
def test_smoke_results_schema(smoke):
    recs = _records(smoke)
    env = recs[0]
    assert env["type"] == "environment" and env["matrix"] == "smoke"
    for key in ("cpu", "cores", "ram_gb", "libraries", "git", "bandwidth", "gemm_fp32_gflops", "env_id"):
        assert key in env, key
    assert env["bandwidth"]["read_gbs"] > 0
    cases = [r for r in recs if r["type"] == "case"]
    assert len(cases) == len(mx.expand(mx.load_matrix("smoke")))
    for c in cases:
        assert c["env_id"] == env["env_id"]
        assert c["status"] in ("ok", "skipped"), (c["id"], c.get("error"), c.get("traceback"))
        if c["status"] == "skipped":
            assert c["reason"]
            continue
        for metric in ("vision_ms", "prefill_ms", "ttft_ms", "prefill_tok_s", "decode_tok_s", "total_ms"):
            s = c["metrics"][metric]
            assert set(s) == STAT_KEYS and s["n"] == 3, (c["id"], metric)
            assert s["p10"] <= s["median"] <= s["p90"] and s["median"] > 0
        assert c["n_generated"] == 8 and c["n_visual_tokens"] == c["shape"]["integrator"]["n_visual_tokens"]
        assert c["peak_rss_mb"] >= c["rss_loaded_mb"] > 0
        assert c["costs"]["decode"]["bytes_per_token"] > 0 and c["limits"]["decode_bound_tok_s"] > 0
        if c["backend"] != "torch" and c["backend"] != "hf_eager":
            assert c["artifact"] and sum(c["artifact_mb"].values()) > 0 and c["export"]["key"]
    torch_case = next(c for c in cases if c["backend"] == "torch")
    assert {"tower_ms", "integrator_ms"} <= set(torch_case["metrics"])


@pytest.mark.slow  # runs the smoke matrix (about a minute on 2 cores, exports cached)
def test_smoke_peers_run_the_same_request(smoke):
    cases = {c["backend"]: c for c in _records(smoke) if c["type"] == "case" and c["status"] == "ok"}
    assert {"torch", "hf_eager"} <= set(cases)
    # same weights, greedy: Hugging Face generate() picks the same first token as edgevlm's loop
    assert cases["hf_eager"]["token_ids_head"][0] == cases["torch"]["token_ids_head"][0]
    for a, b in (("torch", "hf_eager"), ("llamacpp", "llamacpp_raw")):
        if a in cases and b in cases:
            assert cases[a]["n_visual_tokens"] == cases[b]["n_visual_tokens"]
            assert cases[a]["n_prompt_tokens"] == cases[b]["n_prompt_tokens"]
    if "llamacpp_raw" in cases:
        assert cases["llamacpp_raw"]["export"]["key"] == cases["llamacpp"]["export"]["key"]


@pytest.mark.slow  # runs the smoke matrix (about a minute on 2 cores, exports cached)
def test_smoke_resume_skips_finished_cases(smoke, tmp_path):
    copy = tmp_path / "results.jsonl"
    copy.write_text(smoke.read_text())
    out = _run("--matrix", "smoke", "--out", str(copy), "--no-limits", cwd=smoke.parent)  # same relative dirs
    assert out.returncode == 0, out.stderr[-2000:]
    recs = _records(copy)
    assert [r["type"] for r in recs].count("environment") == 2
    assert len([r for r in recs if r["type"] == "case"]) == len([r for r in _records(smoke) if r["type"] == "case"])


@pytest.mark.slow
def test_failures_and_timeouts_are_recorded_and_the_run_goes_on(tmp_path):
    m = {"name": "failing", "defaults": {"new_tokens": 2, "runs": 1, "warmup": 0, "threads": 1},
         "models": [{"preset": "tiny", "label": label, "overrides": dict(SMALL), "integrators": ["ldpv2"]}
                    for label in ("first", "second")],
         "backends": {"torch": ["fp32"]}, "prompt_tokens": [2000]}  # longer than tiny's 1024 positions
    path = tmp_path / "failing.yaml"
    path.write_text(yaml.safe_dump(m))
    out = _run("--matrix", str(path), "--out", "r.jsonl", "--no-limits", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    cases = [r for r in _records(tmp_path / "r.jsonl") if r["type"] == "case"]
    assert [c["model"]["label"] for c in cases] == ["first", "second"]  # the first failure did not stop the run
    for c in cases:
        assert c["status"] == "failed" and c["stage"] == "measure" and "ContextLengthError" in c["error"], c
    out = _run("--matrix", str(path), "--out", "t.jsonl", "--no-limits", "--timeout", "0.5", "--filter", "second",
               cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    (case,) = [r for r in _records(tmp_path / "t.jsonl") if r["type"] == "case"]
    assert case["status"] == "timeout" and "exceeded" in case["error"]


def test_model_dir_case_reports_held_out_accuracy(tiny_model, shapes_dir, tmp_path):
    from edgevlm.benchmarks.report import write_report
    from edgevlm.model.checkpoint import save_model

    save_model(tiny_model, tmp_path / "model")
    m = {"name": "eval", "defaults": {"new_tokens": 2, "prompt_tokens": 8, "runs": 1, "warmup": 0, "threads": 1},
         "models": [{"dir": "model", "label": "saved", "eval": {"data": str(shapes_dir), "max_records": 4}}],
         "backends": {"torch": ["fp32"]}}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(m))
    out = _run("--matrix", "eval.yaml", "--out", "r.jsonl", "--no-limits", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    (case,) = [r for r in _records(tmp_path / "r.jsonl") if r["type"] == "case"]
    assert case["status"] == "ok", case.get("traceback") or case.get("error")
    acc = case["accuracy"]
    assert acc["n"] == 4 and 0.0 <= acc["accuracy"] <= 1.0 and 0.0 <= acc["majority_baseline"] <= 1.0
    report = write_report([str(tmp_path / "r.jsonl")], tmp_path / "report")
    assert (report / "plots" / "pareto.png").is_file()


# --- the report ----------------------------------------------------------------------------------


class _Checker(HTMLParser):
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.tags, self.images, self.headings, self._in_h = [], [], [], [], False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag not in self.VOID:
            self.stack.append(tag)
        self._in_h = tag in ("h1", "h2", "h3")

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()
        self._in_h = False

    def handle_data(self, data):
        if self._in_h:
            self.headings.append(data)


@pytest.mark.slow  # runs the smoke matrix (about a minute on 2 cores, exports cached)
def test_report_renders_from_the_smoke_results(smoke, tmp_path):
    from edgevlm.cli import main

    assert main(["bench", "report", str(smoke), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    page = (tmp_path / "report" / "report.html").read_text()
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert not checker.stack, f"unclosed tags {checker.stack}"
    assert checker.images and all(s.startswith("data:image/png;base64,") for s in checker.images)
    for src in checker.images:  # self-contained: every figure is an inline PNG
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert checker.tags.count("table") >= 5
    heads = " | ".join(checker.headings)
    for part in ("Measured: time to first token", "Measured: edgevlm vs peers", "Projected:",
                 "Validation against published numbers"):
        assert part in heads and part in md
    assert all(h.startswith(("Measured", "Projected", "Validation", "Efficiency", "Environment", "edgevlm",
                             "Failed", "Not measured")) for h in checker.headings), checker.headings
    for png in (tmp_path / "report" / "plots").glob("*.png"):
        assert f"plots/{png.name}" in md


def test_report_refuses_missing_input(tmp_path):
    from edgevlm.cli import main

    assert main(["bench", "report", str(tmp_path / "nothing.jsonl"), "--out", str(tmp_path)]) == 2


def test_ort_vnni_precisions_export_with_the_vnni_int8_format():
    from edgevlm.benchmarks.case import onnx_vision_precision
    from edgevlm.benchmarks.flops import bits_per_weight
    from edgevlm.benchmarks.matrix import export_spec

    assert export_spec("ort", "int4") == {"target": "onnx", "dtype": "fp32", "quantize": "int4"}
    assert export_spec("ort", "int4_vnni") == {"target": "onnx", "dtype": "fp32", "quantize": "int4",
                                               "int8_target": "vnni"}
    assert export_spec("ort", "int8_vnni")["quantize"] == "int8"
    assert export_spec("ort", "fp16") == {"target": "onnx", "dtype": "fp16", "quantize": "none"}
    vision = lambda p: onnx_vision_precision(export_spec("ort", p))  # noqa: E731
    assert vision("int4_vnni") == vision("int4") == vision("int8") == "int8"
    assert vision("fp16") == "fp16" and vision("fp32") == "fp32"
    assert bits_per_weight("int4_vnni") == bits_per_weight("int4")
    from edgevlm.benchmarks.matrix import BACKEND_PRECISIONS
    from edgevlm.export.to_onnx import INT8_TARGETS

    for precision in BACKEND_PRECISIONS["ort"]:  # every suffix is an export --int8-target, with a size
        assert export_spec("ort", precision).get("int8_target", "portable") in INT8_TARGETS, precision
        assert bits_per_weight(precision) == bits_per_weight(precision.partition("_")[0])
