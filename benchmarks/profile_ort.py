"""Where an ONNX bundle's time goes, per stage and operator type, from ONNX Runtime's own profiler.

    python benchmarks/profile_ort.py BUNDLE [--threads 0] [--prompt-tokens 32] [--new-tokens 16]
                                     [--runs 2] [--out profile.md]      (or: edgevlm bench profile)

Runs the benchmark workload (one ``bench_image``, a filler question of ``--prompt-tokens`` tokens,
``--new-tokens`` greedy tokens) once to warm up and ``--runs`` times with profiling on, then sums
ONNX Runtime's per-kernel times by stage (vision = ``vision_encoder``, prefill = the decoder's
first run of a generation, decode = its later runs, per token) and by operator type. The totals
are kernel time only; the stage wall times beside them include ONNX Runtime's own overhead.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

STAGES = ("vision", "prefill", "decode")


def kernel_events(trace: str) -> tuple[list[dict], list[dict]]:
    """(model runs, kernel events) of one session's trace, each in time order."""
    events = json.loads(Path(trace).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    kernels = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    key = lambda e: e["ts"]  # noqa: E731
    return sorted(runs, key=key), sorted(kernels, key=key)


def per_run(runs: list[dict], kernels: list[dict]) -> list[dict[str, float]]:
    """For each model run: {op type: kernel ms}."""
    out: list[dict[str, float]] = [defaultdict(float) for _ in runs]
    i = 0
    for k in kernels:
        while i < len(runs) and k["ts"] > runs[i]["ts"] + runs[i]["dur"]:
            i += 1
        if i < len(runs) and k["ts"] >= runs[i]["ts"]:
            out[i][k["args"].get("op_name", "?")] += k["dur"] / 1e3
    return out


def stage_table(traces: dict[str, str], generations: int, skip: int) -> dict[str, dict]:
    """{stage: {"calls": n, "wall_ms": per call, "ops": {op: ms per call}}} over the profiled
    generations after the first ``skip`` (warm-up) ones."""
    vis_runs, vis_k = kernel_events(traces["vision_encoder"])
    dec_runs, dec_k = kernel_events(traces["decoder"])
    per_gen = len(dec_runs) // generations
    picked: dict[str, list[tuple[dict, dict]]] = {s: [] for s in STAGES}
    picked["vision"] = list(zip(vis_runs, per_run(vis_runs, vis_k)))[skip:]
    for j, (run, ops) in enumerate(zip(dec_runs, per_run(dec_runs, dec_k))):
        if j // per_gen >= skip:
            picked["prefill" if j % per_gen == 0 else "decode"].append((run, ops))
    table = {}
    for stage, rows in picked.items():
        if not rows:
            continue
        ops: dict[str, float] = defaultdict(float)
        for _, o in rows:
            for name, ms in o.items():
                ops[name] += ms / len(rows)
        wall = sum(r["dur"] for r, _ in rows) / len(rows) / 1e3
        table[stage] = {"calls": len(rows), "wall_ms": wall, "ops": dict(sorted(ops.items(), key=lambda x: -x[1]))}
    return table


def render(table: dict[str, dict], title: str, top: int = 8) -> str:
    lines = [f"### {title}", "", "| stage | wall ms / call | kernel ms / call | top operator types (ms / call, share of kernel time) |",
             "|---|---|---|---|"]
    for stage, t in table.items():
        total = sum(t["ops"].values())
        ops = ", ".join(f"{op} {ms:.1f} ({ms / max(total, 1e-9):.0%})" for op, ms in list(t["ops"].items())[:top])
        lines.append(f"| {stage} (x{t['calls']}) | {t['wall_ms']:.1f} | {total:.1f} | {ops} |")
    return "\n".join(lines) + "\n"


def profile(bundle: str, threads: int, prompt_tokens: int, new_tokens: int, runs: int) -> dict[str, dict]:
    import numpy as np

    from edgevlm.benchmarks.matrix import bench_image, filler_question, image_prompt
    from edgevlm.runtime.engine import Runtime
    from edgevlm.runtime.generate import GenerationConfig, generate

    with tempfile.TemporaryDirectory() as tmp:
        rt = Runtime.load(bundle, backend="ort", threads=threads, profile_dir=tmp, image_cache_mb=0)
        ids = rt.prompt_ids(image_prompt(filler_question(rt.tokenizer.encode, prompt_tokens), 1), with_image=True)
        pixels = np.ascontiguousarray(rt.pixel_values(bench_image(0)))
        cfg = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
        for _ in range(1 + runs):
            generate(rt.backend, rt.tokenizer, ids, pixels, cfg)
        traces = rt.backend.end_profiling()
        rt.close()
        return stage_table(traces, 1 + runs, skip=1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="an ONNX bundle")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: every usable core)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--runs", type=int, default=2, help="profiled generations after one warm-up")
    p.add_argument("--out", help="also write the table (markdown) here")


def run(args: argparse.Namespace) -> int:
    table = profile(args.bundle, args.threads, args.prompt_tokens, args.new_tokens, args.runs)
    text = render(table, f"ONNX Runtime profile: {args.bundle}")
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    from edgevlm.cli import script_main

    script_main("bench", "profile")
