"""Run a benchmark matrix: every case in a fresh subprocess, results appended to a JSONL file.

Example:
    python benchmarks/run.py --matrix smoke --out results.jsonl
    python benchmarks/run.py --matrix benchmarks/matrices/integrators.yaml --out int.jsonl --filter llamacpp
    python benchmarks/report.py results.jsonl --out report/

The file starts with an environment record (CPU, cores, RAM, GPU, library versions, git commit,
measured memory bandwidth); then one record per case: ``status`` ok | failed | timeout | skipped,
its metrics (median, p10, p90 over runs), memory, artifact sizes, analytic stage costs and the
decode rate as a fraction of the bandwidth bound. Re-running with the same --out resumes: cases
already ``ok`` are skipped, failed ones are retried (--no-resume starts the file afresh). A
failed or timed-out case is recorded with its error and the run goes on.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgevlm.benchmarks.matrix import shipped_matrices
from edgevlm.runtime.errors import EdgeVLMError

CASE_KEYS = ("id", "task", "kind", "backend", "precision", "model", "integrator", "workload", "warmup", "runs", "seed")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--matrix", required=True,
                   help=f"matrix YAML, or a shipped name: {', '.join(shipped_matrices())}")
    p.add_argument("--out", required=True, help="results JSONL (appended; resumable)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="skip cases already ok in --out (default: on)")
    p.add_argument("--timeout", type=float, default=None,
                   help="per-case measurement timeout in s (default: the matrix's timeout_s)")
    p.add_argument("--filter", action="append", default=[],
                   help="only case ids containing this text (repeatable; '!text' excludes)")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    p.add_argument("--no-limits", action="store_true", help="skip the bandwidth/GEMM measurement (not for reports)")


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from edgevlm.benchmarks.environment import collect, summary_line
    from edgevlm.benchmarks.matrix import expand, load_matrix, select

    matrix = load_matrix(args.matrix)
    cases = select(expand(matrix, Path.cwd()), args.filter)
    if args.list:
        for c in cases:
            print(c["id"] + (f"  [skip: {c['skip']}]" if c["skip"] else ""))
        return 0
    if not cases:
        raise EdgeVLMError("no case matches the filter")
    out = Path(args.out)
    done = finished(out) if args.resume else {}
    if not args.resume and out.exists():
        out.unlink()
    out.parent.mkdir(parents=True, exist_ok=True)
    env = collect(measure_limits=not args.no_limits)
    env.update(matrix=matrix["name"], matrix_path=matrix["path"])
    append(out, env)
    print(summary_line(env), file=sys.stderr)
    counts: dict[str, int] = {}
    bar = tqdm(cases, desc=f"bench {matrix['name']}", unit="case")
    for case in bar:
        prior = done.get(case["id"])
        if prior is not None and (prior["status"] == "ok" or prior.get("reason") == case["skip"]):
            counts["resumed"] = counts.get("resumed", 0) + 1
            continue
        bar.set_postfix_str(case["id"])
        record = run_case(case, env, args.timeout)
        append(out, record)
        counts[record["status"]] = counts.get(record["status"], 0) + 1
        if record["status"] in ("failed", "timeout"):
            bar.write(f"{case['id']}: {record['status']}: {record.get('error', '')[:300]}")
    bar.close()
    print(f"{out}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), file=sys.stderr)
    return 0


def finished(path: Path) -> dict[str, dict]:
    """The latest record of each case already in ``path`` that need not run again: ok, or skipped
    (a skip is re-recorded only when its reason changed)."""
    if not path.is_file():
        return {}
    latest = {rec["id"]: rec for rec in read_records(path) if rec.get("type") == "case"}
    return {i: r for i, r in latest.items() if r["status"] in ("ok", "skipped")}


def read_records(path: Path) -> list[dict]:
    """Every JSON line of a results file (a torn last line from a killed run is ignored)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_case(case: dict, env: dict, timeout: float | None) -> dict:
    """prepare (export, cached) -> describe -> measure, each failure recorded, never raised."""
    from edgevlm.benchmarks.case import describe
    from edgevlm.benchmarks.matrix import cache_root, export_key

    record = {"type": "case", **{k: case[k] for k in CASE_KEYS}, "env_id": env["env_id"],
              "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if case["skip"]:
        return {**record, "status": "skipped", "reason": case["skip"]}
    t0 = time.perf_counter()
    try:
        key = export_key(case)
        if key is not None:
            case["export_dir"] = str(cache_root() / key)
            prep = subprocess_step("prepare", case, case["export_timeout_s"])
            if prep["status"] != "ok":
                return {**record, **_failure(prep, "prepare"), "wall_s": round(time.perf_counter() - t0, 1)}
            record["export"] = {"key": key, "cached": prep.get("export_cached"), "export_s": prep.get("export_s")}
        case["prepared"] = describe(case)
    except EdgeVLMError as e:
        return {**record, "status": "failed", "stage": "describe", "error": str(e)}
    res = subprocess_step("measure", case, timeout or case["timeout_s"])
    record["wall_s"] = round(time.perf_counter() - t0, 1)
    if res["status"] != "ok":
        return {**record, **_failure(res, "measure")}
    return finish_record(record, case, res, env)


def _failure(res: dict, stage: str) -> dict:
    return {"status": res["status"], "stage": stage, "error": res.get("error", ""),
            **({"traceback": res["traceback"]} if res.get("traceback") else {}),
            **({"output_tail": res["output_tail"]} if res.get("output_tail") else {})}


def finish_record(record: dict, case: dict, res: dict, env: dict) -> dict:
    """The measurement plus what the report derives from it: analytic costs and the bandwidth bound."""
    from edgevlm.benchmarks.flops import stage_costs

    prep = case["prepared"]
    res.pop("step_s", None)
    if case["task"] == "fidelity":  # no timings: nothing to hold against a roofline
        record.update(res)
        record.update(shape=prep["shape"], artifact=prep.get("artifact"), artifact_mb=prep.get("artifact_mb", {}))
        return record
    costs = stage_costs(prep["shape"], case["precision"], prep.get("vision_precision"), prep.get("kv_bits", 16),
                        n_images=case["workload"]["images"], n_text=res.get("n_prompt_tokens", 0),
                        n_new=case["workload"]["new_tokens"], decode_weight_bytes=prep.get("decode_weight_bytes"))
    record.update(res)
    record.update(shape=prep["shape"], artifact=prep.get("artifact"), artifact_mb=prep.get("artifact_mb", {}),
                  costs=costs, limits=bandwidth_limits(res, costs, env))
    return record


def bandwidth_limits(res: dict, costs: dict, env: dict) -> dict | None:
    """The decode rate against ``bandwidth / bytes read per token``. When those bytes fit in the
    last-level cache the weights need not come from DRAM and the bound does not apply."""
    bw = (env.get("bandwidth") or {}).get("read_gbs")
    if not bw:
        return None
    per_token = costs["decode"]["bytes_per_token"]
    bound = bw * 1e9 / per_token
    decode = (res.get("metrics", {}).get("decode_tok_s") or {}).get("median")
    llc_mb = max((env.get("cache_mb") or {}).values(), default=0.0)
    return {"bandwidth_gbs": bw, "bytes_per_token": round(per_token), "decode_bound_tok_s": round(bound, 2),
            "decode_fraction_of_bound": round(decode / bound, 3) if decode else None,
            "cache_resident": per_token <= llc_mb * 2**20}


def subprocess_step(step: str, case: dict, timeout: float) -> dict:
    """Run one worker step in a fresh process group; a timeout kills the whole group."""
    threads = int(case["workload"].get("threads") or 0)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if threads:
        env.update({k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    with tempfile.TemporaryDirectory(prefix="edgevlm-bench-") as tmp:
        case_file, out_file = Path(tmp) / "case.json", Path(tmp) / "result.json"
        case_file.write_text(json.dumps(case, default=str))
        cmd = [sys.executable, "-m", "edgevlm.benchmarks.case", step, "--case", str(case_file), "--out", str(out_file)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            return {"status": "timeout", "error": f"{step} exceeded {timeout:.0f} s",
                    "output_tail": output.decode(errors="replace")[-2000:]}
        if out_file.is_file():
            return json.loads(out_file.read_text())
        return {"status": "failed", "error": f"{step} worker died with status {proc.returncode}",
                "output_tail": output.decode(errors="replace")[-2000:]}


if __name__ == "__main__":
    from edgevlm.cli import script_main

    script_main("bench", "run")
