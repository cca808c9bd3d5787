"""docs/ tables that quote measurements match the stored results they were measured from
(benchmarks/results/): the int8 format and check tables, int4 at 1.7B, the integrator study, the
Hugging Face baseline per run, the performance tables and the integrators matrix."""
import json
import re

import pytest

from docs_text import DOCS, RESULTS, close, median, section, stored, table


INTEGRATOR_COLUMNS = {
    "integrator ms (torch)": ("torch", "fp32", "integrator_ms"),
    "torch fp32 TTFT ms": ("torch", "fp32", "ttft_ms"),
    "Hugging Face TTFT ms": ("hf_eager", "fp32", "ttft_ms"),
    "`ort` int4 TTFT ms": ("ort", "int4", "ttft_ms"),
    "`llamacpp` q4_k_m TTFT ms": ("llamacpp", "q4_k_m", "ttft_ms"),
    "`ort` int4 decode tok/s": ("ort", "int4", "decode_tok_s"),
    "`llamacpp` q4_k_m decode tok/s": ("llamacpp", "q4_k_m", "decode_tok_s"),
    "raw llama.cpp decode tok/s": ("llamacpp_raw", "q4_k_m", "decode_tok_s"),
}


def test_int8_table_matches_stored_results():
    """docs/int8-portability.md's format table is benchmarks/int8_formats.py's output on the VNNI host
    and under qemu -cpu Haswell (AVX2), as stored in benchmarks/results/int8/."""
    host = json.loads((RESULTS / "int8" / "tiny_x86-vnni.json").read_text())["formats"]
    avx2 = json.loads((RESULTS / "int8" / "tiny_avx2-qemu.json").read_text())["formats"]
    rows = table((DOCS / "int8-portability.md").read_text(), "| `--int8-target` |")
    assert sorted(r[0].split()[0].strip("`") for r in rows) == sorted(host)
    for r in rows:
        fmt = r[0].split()[0].strip("`")
        for cell, graph in ((r[3], "vision_encoder_rel_l2"), (r[4], "decoder_rel_l2")):
            on_host, on_avx2 = (v.strip().strip("*") for v in cell.split("/"))
            assert close(on_host, host[fmt][graph]), (fmt, graph, on_host)
            assert close(on_avx2, avx2[fmt][graph]), (fmt, graph, on_avx2)
        # the decoder against its integer twin (the export's kernel check), measured on the VNNI host
        on_host = r[5].split("/")[0].strip()
        assert close(on_host, host[fmt]["decoder_vs_twin_rel_l2"]), (fmt, on_host)


def _check_table_matches_manifest(variant: str, heading: str) -> dict:
    """The "check on the <variant> decoder" table under ``heading`` is the stored 1.7B manifest's
    decoder validation (vs fp32, twin vs fp32, vs the twin, worst weight). Returns target_info."""
    info = json.loads((RESULTS / f"{variant}-1.7b" / "manifest.json").read_text())["target_info"]
    check = info["graphs"]["decoder"]["validation"]
    text = section((DOCS / "int8-portability.md").read_text(), heading)
    values = [r[1] for r in table(text, f"| check on the {variant} decoder |")]
    expected = [check["max_rel_l2_all_outputs"], check["dequantized_vs_fp32_rel_l2"],
                check["kernels"]["max_rel_l2"], check["weights"]["max"]]
    assert len(values) == len(expected)
    for shown, value in zip(values, expected):
        assert close(shown, value), (shown, value)
    assert f"({check['weights']['n_matrices']} matrices" in text
    return info


def test_int8_check_numbers_match_stored_manifest():
    _check_table_matches_manifest("int8", "## How quantised decoders are checked")


def test_int4_numbers_match_stored_manifest():
    """docs/int8-portability.md's int4-at-1.7B table and token check are the stored export manifest's."""
    info = _check_table_matches_manifest("int4", "## int4 at MobileVLM-1.7B shape")
    text = section((DOCS / "int8-portability.md").read_text(), "## int4 at MobileVLM-1.7B shape")
    tc = info["token_check"]
    for phrase, value in (("mean ", tc["kl_mean"]), ("same top token ", tc["same_top_token"])):
        shown = re.search(re.escape(phrase) + r"([\d.]+)", text).group(1)
        assert close(shown, value), (phrase, shown, value)


def test_integrator_study_excerpt_matches_stored_study():
    """docs/integrator-study.md's excerpt is benchmarks/results/integrators/study.json: accuracy
    overall / colour / count and median TTFT at MobileVLM-1.7B shape."""
    study = json.loads((RESULTS / "integrators" / "study.json").read_text())
    acc = {r["integrator"]: r for r in study["integrators"]}
    ttft = {c["integrator"]: c["metrics"]["ttft_ms"]["median"] for c in study["latency"]
            if c.get("type") == "case" and "ttft_ms" in c.get("metrics", {})}
    rows = table((DOCS / "integrator-study.md").read_text(), "| integrator | tokens |")
    names_seen = []
    for r in rows:
        names = re.findall(r"`(\w+)`", r[0])
        names_seen += names
        cells = [[v.strip() for v in c.split("/")] for c in r[1:]]
        for i, name in enumerate(names):
            pick = [c[i] if len(c) > 1 else c[0] for c in cells]
            e = acc[name]["eval"]
            assert int(pick[0]) == acc[name]["n_visual_tokens_1p7b"], name
            assert close(pick[1], e["overall"]["accuracy"]), (name, "overall")
            assert close(pick[2], e["per_type"]["colour"]["accuracy"]), (name, "colour")
            assert close(pick[3], e["per_type"]["count"]["accuracy"]), (name, "count")
            assert close(pick[4], ttft[name]), (name, "ttft")
    assert sorted(names_seen) == sorted(acc)


def test_hugging_face_baseline_per_run_matches_stored_results():
    """docs/measurements.md's one-baseline-per-run table: each run's Hugging Face eager TTFT and decode
    medians and its commit are the stored JSONL's."""
    rows = table((DOCS / "measurements.md").read_text(), "| run | results file | commit |")
    assert len(rows) >= 3
    for run, results, commit, ttft, decode in rows:
        records = stored(results.strip("`").removeprefix("benchmarks/results/"))
        hf = [r for r in records if (r.get("backend"), r.get("integrator"), r.get("status")) == ("hf_eager", "ldp", "ok")][-1]
        assert int(ttft.replace(",", "")) == round(hf["metrics"]["ttft_ms"]["median"]), run
        assert close(decode, hf["metrics"]["decode_tok_s"]["median"]), run
        commits = [r["git"]["commit"] for r in records if r.get("type") == "environment"]
        assert commits[0].startswith(commit), (run, commits[0])


PERF_HEAD = "| case | TTFT ms | vision ms | prefill ms | decode tok/s | "


@pytest.mark.parametrize("run, header, min_rows", [
    ("quant/quant.jsonl", PERF_HEAD + "fraction", 5),
    ("ttft/ttft.jsonl", PERF_HEAD + "TTFT vs Hugging Face | decode vs", 5),
    ("ttft/int8_rerun.jsonl", PERF_HEAD + "TTFT vs Hugging Face | fraction", 3),
    ("ttft/fresh_epyc.jsonl", PERF_HEAD + "TTFT vs Hugging Face (AMD EPYC)", 5)])
def test_perf_tables_match_stored_results(run, header, min_rows):
    """docs/perf-1.7b.md's tables are the committed benchmark runs' medians (TTFT, vision, prefill in
    ms; decode tok/s to 3 figures)."""
    records = stored(run)
    rows = table((DOCS / "perf-1.7b.md").read_text(), header)
    assert len(rows) >= min_rows
    for label, ttft, vision, prefill, decode, *_ in rows:
        backend, precision = re.search(r"(Hugging Face|raw llama.cpp|`\w+`) ([\w-]+)", label).groups()
        backend = {"Hugging Face": "hf_eager", "raw llama.cpp": "llamacpp_raw"}.get(backend, backend.strip("`"))
        precision = "fp32" if backend == "hf_eager" else precision
        for cell, metric in ((ttft, "ttft_ms"), (vision, "vision_ms"), (prefill, "prefill_ms")):
            assert int(cell.replace(",", "")) == round(median(records, backend, precision, metric)), (label, metric)
        assert float(decode) == float(f"{median(records, backend, precision, 'decode_tok_s'):.3g}"), label


def test_integrators_table_matches_stored_results():
    """The integrators table is the committed `integrators` run: every number is that case's median
    (ms to the unit, rates and the integrator's ms to 3 figures), the visual token count is the
    case's, "cannot export" is a case the matrix skipped for its integrator, and "not run" a case
    with no result, "failed" a case recorded as failed."""
    by_case = {(r["integrator"], r["backend"], r["precision"]): r
               for r in stored("integrators/integrators.jsonl") if r.get("type") == "case"}
    text = (DOCS / "perf-1.7b.md").read_text()
    header = "| integrator | visual tokens | "
    columns = [c.strip() for c in text[text.index(header):].splitlines()[0].strip().strip("|").split("|")]
    assert set(columns[2:]) == set(INTEGRATOR_COLUMNS)
    rows = table(text, header)
    assert len(rows) == 12
    for integrator, n_visual, *cells in rows:
        integrator = integrator.strip("`")
        assert int(n_visual) == by_case[(integrator, "torch", "fp32")]["n_visual_tokens"], integrator
        for column, cell in zip(columns[2:], cells):
            backend, precision, metric = INTEGRATOR_COLUMNS[column]
            rec = by_case.get((integrator, backend, precision))
            where = (integrator, column)
            if cell == "cannot export":
                assert rec["status"] == "skipped" and "cannot be exported" in rec["reason"], where
            elif cell == "failed":
                assert rec["status"] == "failed", where
            elif cell == "not run":
                assert rec is None or rec["status"] != "ok", where
            else:
                value = rec["metrics"][metric]["median"]
                expected = f"{value:.3g}" if metric != "ttft_ms" else f"{round(value):,}"
                assert cell == expected, where
