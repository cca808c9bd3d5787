"""Turn benchmark results into ``report.md`` and a self-contained ``report.html`` (plots inlined).

Example: python benchmarks/report.py results.jsonl [more.jsonl ...] --out report/

Sections are labelled **Measured** (this host, this run) or **Projected** (roofline model, other
devices); no table or figure mixes the two. Tables are sorted best first. Where a case id appears
in several files or runs, the latest record wins.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgevlm.benchmarks.report_fidelity import fidelity_blocks
from edgevlm.benchmarks.report_projection import projection_blocks
from edgevlm.benchmarks.report_render import Block, fmt, med, render_html, render_md, write_plots
from edgevlm.runtime.errors import EdgeVLMError


# --- loading -------------------------------------------------------------------------------------


def load_results(paths: list[str]) -> tuple[list[dict], list[dict]]:
    """(environment records, case records: the latest per id)."""
    from edgevlm.benchmarks.run import read_records

    envs, cases = [], {}
    for p in paths:
        if not Path(p).is_file():
            raise EdgeVLMError(f"{p}: no such results file")
        for rec in read_records(Path(p)):
            if rec.get("type") == "environment":
                envs.append(rec)
            elif rec.get("type") == "case":
                cases[rec["id"]] = rec
    if not cases:
        raise EdgeVLMError(f"{', '.join(paths)}: no case records")
    return envs, list(cases.values())


def spread(rec: dict, metric: str) -> str:
    s = (rec.get("metrics") or {}).get(metric)
    if not s:
        return "-"
    return f"{fmt(s['median'])} [{fmt(s['p10'])}-{fmt(s['p90'])}]"


def label(rec: dict, full: bool = False) -> str:
    base = f"{rec['model']['label']}/{rec['integrator'] or 'own'} {rec['backend']} {rec['precision']}"
    if rec.get("measured_on") == "target":  # edgevlm bench-target on the device (runtime/bench_target.py)
        base += f" @{rec.get('device', 'target')}"
    w = rec["workload"]
    return base + (f" t{w['threads']} i{w['images']} p{w['prompt_tokens']} n{w['new_tokens']}" if full else "")


# --- sections ------------------------------------------------------------------------------------


def environment_blocks(envs: list[dict]) -> list[Block]:
    from edgevlm.benchmarks.environment import summary_line

    seen, rows = set(), []
    for e in envs:
        if e["env_id"] in seen:
            continue
        seen.add(e["env_id"])
        libs = ", ".join(f"{k} {v}" for k, v in sorted(e.get("libraries", {}).items()))
        gemm = " / ".join(f"{e[k]} GFLOP/s {name}" for k, name in (("gemm_fp32_gflops", "fp32"), ("gemm_bf16_gflops", "bf16"))
                          if e.get(k)) or "-"
        host = summary_line(e) if e.get("measured_on") != "target" else \
            f"target device ({e.get('cpu_class')}): " + summary_line(e).split("; read bandwidth")[0]
        rows.append([e["env_id"], e.get("time_utc", ""), host + (f" [{e['note']}]" if e.get("note") else ""), gemm, libs])
    blocks: list[Block] = [("h2", "Environment"), ("table", ["env", "started", "host", "GEMM rate", "libraries"], rows)]
    busy = [e for e in envs if (e.get("load_avg_1m") or 0) > 0.5 * (e.get("cores", {}).get("usable") or 1)]
    if busy:
        blocks.append(("p", f"Note: {len(busy)} run(s) started on a busy machine (1-minute load above half the "
                            "usable cores); their timings are noisy and only good for checking the machinery (fidelity numbers "
                            "do not depend on load)."))
    return blocks


def status_blocks(cases: list[dict]) -> list[Block]:
    counts: dict[str, int] = {}
    for c in cases:
        counts[c["status"]] = counts.get(c["status"], 0) + 1
    blocks: list[Block] = [("p", "Cases: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))]
    bad = [c for c in cases if c["status"] in ("failed", "timeout")]
    if bad:
        rows = [[c["id"], c["status"], c.get("stage", ""), c.get("error", "")[:300]] for c in bad]
        blocks += [("h3", "Failed cases"), ("table", ["case", "status", "stage", "error"], rows)]
    skipped = [c for c in cases if c["status"] == "skipped"]
    if skipped:
        rows = [[c["id"], c["reason"]] for c in skipped]
        blocks += [("h3", "Not measured here (skipped)"), ("table", ["case", "reason"], rows)]
    return blocks


def latency_blocks(ok: list[dict], full: bool) -> list[Block]:
    from edgevlm.benchmarks import plots

    rows = sorted(ok, key=lambda r: med(r, "ttft_ms") or float("inf"))
    table = [[label(r, full), r["kind"], r.get("n_visual_tokens"), r.get("n_prompt_tokens"), spread(r, "ttft_ms"),
              *(fmt(med(r, m)) for m in ("vision_ms", "tower_ms", "integrator_ms", "prefill_ms", "prefill_tok_s"))]
             for r in rows]
    bars = [{"label": label(r, full), "ttft_ms": med(r, "ttft_ms") or 0, "vision_ms": med(r, "vision_ms"),
             "tower_ms": med(r, "tower_ms"), "integrator_ms": med(r, "integrator_ms"),
             "prefill_ms": med(r, "prefill_ms")} for r in rows]
    return [("h2", "Measured: time to first token (best first)"),
            ("p", "Median [p10-p90] over runs. vision = image to visual tokens (tower + integrator in one graph on "
                  "ort/llamacpp); tower and integrator are timed apart on the torch backend only. "
                  "Prompt tokens are text tokens; visual tokens come on top."),
            ("table", ["case", "kind", "visual tok", "text tok", "TTFT ms", "vision ms", "tower ms", "integrator ms",
                       "prefill ms", "prefill tok/s"], table),
            ("img", "ttft_breakdown", plots.ttft_breakdown(bars),
             "TTFT by stage: vision tower + integrator (torch), or vision as one graph (ort, llama.cpp), prefill, "
             "other (sampling, splicing)")]


def throughput_blocks(ok: list[dict], full: bool) -> list[Block]:
    from edgevlm.benchmarks import plots

    rows = sorted(ok, key=lambda r: -(med(r, "decode_tok_s") or 0))
    table = []
    for r in rows:
        art = r.get("artifact_mb") or {}
        acc = r.get("accuracy") or {}
        table.append([label(r, full), spread(r, "decode_tok_s"), fmt(r.get("peak_rss_mb")), fmt(r.get("rss_loaded_mb")),
                      fmt(r.get("gpu_peak_mb")), fmt(sum(v for k, v in art.items() if not k.startswith("tokenizer"))),
                      fmt(acc.get("accuracy")), fmt(acc.get("majority_baseline"))])
    grouped = [{"group": f"{r['model']['label']}/{r['integrator'] or 'own'}",
                "series": f"{r['backend']} {r['precision']}",
                **_with_spread(r, "ttft_ms"), **_with_spread(r, "decode_tok_s")} for r in ok]
    mem = sorted(({"label": label(r, full), "peak_rss_mb": r.get("peak_rss_mb") or 0, "peer": r["kind"] == "peer"}
                  for r in ok), key=lambda x: x["peak_rss_mb"])
    return [("h2", "Measured: decode rate, memory, accuracy (best decode first)"),
            ("p", "Decode tok/s = (new tokens - 1) / decode time, EOS ignored. Peak RSS is the case process's "
                  "high-water mark (VmHWM), taken before any accuracy evaluation; artifact = files the backend "
                  "loads. Accuracy only where the weights are trained (exact match, held-out split)."),
            ("table", ["case", "decode tok/s", "peak RSS MB", "RSS after load MB", "GPU peak MB", "artifact MB",
                       "accuracy", "majority baseline"], table),
            ("img", "ttft_by_integrator",
             plots.grouped_bars(grouped, "ttft_ms", "TTFT ms", "Measured: TTFT by integrator x backend"),
             "TTFT by integrator and backend"),
            ("img", "decode_by_integrator",
             plots.grouped_bars(grouped, "decode_tok_s", "decode tok/s",
                                "Measured: decode tok/s by integrator x backend"),
             "Decode rate by integrator and backend"),
            ("img", "peak_memory",
             plots.horizontal_bars(mem, "peak_rss_mb", "peak RSS, MB", "Measured: peak memory per case (peers in red)"),
             "Peak memory")]


def _with_spread(rec: dict, metric: str) -> dict:
    s = (rec.get("metrics") or {}).get(metric) or {}
    return {metric: s.get("median"), f"{metric}_p10": s.get("p10", s.get("median")),
            f"{metric}_p90": s.get("p90", s.get("median"))}


def pareto_blocks(ok: list[dict]) -> list[Block]:
    from edgevlm.benchmarks import plots

    pts = [{"label": label(r), "ttft_ms": med(r, "ttft_ms"), "accuracy": r["accuracy"]["accuracy"]}
           for r in ok if (r.get("accuracy") or {}).get("accuracy") is not None and med(r, "ttft_ms")]
    if not pts:
        return [("h2", "Measured: accuracy vs TTFT"),
                ("p", "No case in these results has trained weights with an eval spec (random-weight presets have "
                      "no meaningful accuracy); add a trained model dir with `eval:` to the matrix.")]
    return [("h2", "Measured: accuracy vs TTFT (Pareto)"), ("img", "pareto", plots.pareto(pts), "Accuracy vs TTFT")]


def _peer_key(r: dict) -> tuple:
    return r["model"]["label"], r["integrator"], json.dumps(r["workload"], sort_keys=True)


def peer_blocks(ok: list[dict], full: bool) -> list[Block]:
    peers = [r for r in ok if r["kind"] == "peer"]
    rows = []
    for r in (r for r in ok if r["kind"] == "edgevlm"):
        for p in peers:
            if _peer_key(p) != _peer_key(r):
                continue
            if p["backend"] == "llamacpp_raw" and (r["backend"] != "llamacpp" or p["precision"] != r["precision"]):
                continue
            t_e, t_p, d_e, d_p = med(r, "ttft_ms"), med(p, "ttft_ms"), med(r, "decode_tok_s"), med(p, "decode_tok_s")
            rows.append([label(r, full), f"{p['backend']} {p['precision']}", fmt(t_e), fmt(t_p),
                         fmt(t_p / t_e if t_e and t_p else None), fmt(d_e), fmt(d_p),
                         fmt(d_e / d_p if d_e and d_p else None), fmt(r.get("peak_rss_mb")), fmt(p.get("peak_rss_mb"))])
    if not rows:
        return [("h2", "Measured: edgevlm vs peers"), ("p", "No peer ran beside these cases.")]
    rows.sort(key=lambda x: -float(x[7]) if x[7] != "-" else 0)
    return [("h2", "Measured: edgevlm vs peers, side by side"),
            ("p", "Same weights, image, prompt length and new tokens, measured in the same run. Peers: `hf_eager` = "
                  "Hugging Face generate() in eager PyTorch (MobileVLM's own inference path); `llamacpp_raw` = "
                  "llama.cpp's C API on the same GGUF with no edgevlm code. Ratios > 1 mean edgevlm is faster."),
            ("table", ["edgevlm case", "peer", "TTFT ms", "peer TTFT ms", "TTFT speed-up", "decode tok/s",
                       "peer decode tok/s", "decode ratio", "peak RSS MB", "peer peak RSS MB"], rows)]


def bandwidth_blocks(ok: list[dict], full: bool) -> list[Block]:
    rows = []
    for r in sorted(ok, key=lambda r: -((r.get("limits") or {}).get("decode_fraction_of_bound") or 0)):
        lim = r.get("limits")
        if not lim:
            continue
        frac = "n/a: weights fit in cache" if lim.get("cache_resident") else fmt(lim.get("decode_fraction_of_bound"))
        rows.append([label(r, full), fmt(med(r, "decode_tok_s")), fmt(lim["bytes_per_token"] / 2**20),
                     fmt(lim["bandwidth_gbs"]), fmt(lim["decode_bound_tok_s"]), frac])
    if not rows:
        return []
    return [("h2", "Measured: decode rate against the memory-bandwidth bound"),
            ("p", "Bound = measured read bandwidth (STREAM-like, this host) / bytes one decode step reads (LLM "
                  "weights without the embedding table, from the artifact itself, plus the KV cache at the mean "
                  "context). A fraction near 1 means the backend streams weights as fast as the memory allows."),
            ("table", ["case", "decode tok/s", "MB read per token", "bandwidth GB/s", "bound tok/s",
                       "fraction of bound"], rows)]


def build(paths: list[str], studies: list[str] = ()) -> list[Block]:
    """Blocks for the results files, then the integrator studies (study.json files), if any."""
    envs, cases = load_results(paths)
    fidelity = [c for c in cases if c["status"] == "ok" and c.get("task") == "fidelity"]
    ok = [c for c in cases if c["status"] == "ok" and c.get("task", "latency") == "latency"]
    workloads = {json.dumps(c["workload"], sort_keys=True) for c in ok}
    full = len(workloads) > 1
    blocks: list[Block] = [
        ("h1", "edgevlm latency report"),
        ("p", f"From {', '.join(paths)}. Sections titled 'Measured' were timed on the host below in fresh "
              "processes (warm-up runs, then timed runs with fixed seeds and a fixed number of new tokens). "
              "Sections titled 'Projected' are model estimates for hardware we did not run on; fidelity sections "
              "compare outputs, not times.")]
    if any(e.get("measured_on") == "target" for e in envs):
        blocks.append(("p", "Rows marked @<CPU class> were measured on the target device itself (`edgevlm "
                            "bench-target`, the lean runtime install), not projected; the others on the host."))
    blocks += environment_blocks(envs) + status_blocks(cases)
    if ok:
        blocks += latency_blocks(ok, full) + throughput_blocks(ok, full) + pareto_blocks(ok)
        blocks += peer_blocks(ok, full) + bandwidth_blocks(ok, full) + projection_blocks(envs, ok)
    blocks += fidelity_blocks(fidelity)
    for path in studies:
        from edgevlm.benchmarks.study_report import study_blocks

        try:
            blocks += study_blocks(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError) as e:
            raise EdgeVLMError(f"{path}: not a study.json from benchmarks/study_integrators.py ({e})") from None
    return blocks


def write_report(paths: list[str], out_dir: str | Path, studies: list[str] = ()) -> Path:
    out = Path(out_dir)
    blocks = build(paths, studies)
    write_plots(blocks, out / "plots")
    (out / "report.md").write_text(render_md(blocks, "plots"))
    (out / "report.html").write_text(render_html(blocks, "edgevlm latency report"))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="+", help="results JSONL file(s) from benchmarks/run.py")
    p.add_argument("--out", default="report", help="output folder (default: %(default)s)")
    p.add_argument("--study", action="append", default=[], metavar="STUDY_JSON",
                   help="add an integrator study (benchmarks/study_integrators.py output; repeatable)")


def run(args: argparse.Namespace) -> int:
    out = write_report(args.results, args.out, args.study)
    print(f"wrote {out / 'report.md'} and {out / 'report.html'}")
    return 0


if __name__ == "__main__":
    from edgevlm.cli import script_main

    script_main("bench", "report")
