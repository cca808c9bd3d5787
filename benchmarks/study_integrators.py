"""Accuracy-latency study of the integrators: same data, paradigm, budget and seed for each.

    python benchmarks/study_integrators.py --base runs/tiny/final --out benchmarks/results/integrators

For every integrator: train it with a paradigm recipe (default: two-stage, train/configs/paradigms/)
starting from ``--base`` with the integrator freshly initialised (the base's vision tower and LLM
play the part of MobileVLM's pretrained CLIP and MobileLLaMA), evaluate held-out exact-match
accuracy per question type with small-object questions split out, and measure latency with the
benchmark suite at MobileVLM-1.7B shape (random weights; timing does not depend on values). The
join goes to ``study.json`` + ``study.md`` with an accuracy-vs-TTFT Pareto chart per backend.

Each integrator's training and eval land in ``<out>/runs/<name>/`` and are reused on a rerun
(delete the folder to redo one), so the study can be resumed or split across processes with
``--integrators``. Caveat printed in the report: the base's vision tower was trained together with
the base's own integrator, which favours that integrator.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from edgevlm.runtime.errors import EdgeVLMError

# vlora at the paper's size (generator dim 512, depth 8, rank 64) is ~212M parameters at the tiny
# shape, more than the rest of the model; the study scales it to the tiny LLM.
DEFAULT_KWARGS = {"vlora": "{dim: 128, depth: 2, rank: 16, every: 1}"}


def paradigms_dir() -> Path:
    import edgevlm.train

    return Path(edgevlm.train.__file__).parent / "configs" / "paradigms"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default="runs/tiny/final", help="trained model dir the integrators start from")
    p.add_argument("--data", default="data/shapes", help="ShapesVQA folder (captions/train/test)")
    p.add_argument("--out", default="benchmarks/results/integrators", help="output folder")
    p.add_argument("--integrators", default="all", help="comma-separated names, or all (default)")
    p.add_argument("--paradigm", default="two_stage", help="recipe in train/configs/paradigms/ or a YAML path")
    p.add_argument("--kwargs", action="append", default=[], metavar="NAME={k: v, ...}",
                   help="integrator kwargs for training and latency (repeatable); default: "
                        + "; ".join(f"{k}={v}" for k, v in DEFAULT_KWARGS.items()))
    p.add_argument("--eval-records", type=int, default=240, help="held-out test questions per integrator")
    p.add_argument("--threads", type=int, default=0, help="torch threads for training/eval (0: default)")
    p.add_argument("--latency", default="torch:fp32",
                   help="backend:precision list for the 1.7B latency cases, e.g. torch:fp32,llamacpp:q4_k_m; "
                        "'none' skips latency")
    p.add_argument("--runs", type=int, default=3, help="timed runs per latency case")
    p.add_argument("--no-limits", action="store_true", help="skip the bandwidth measurement of the latency run")
    p.add_argument("--latency-preset", default="mobilevlm-1.7b", help="architecture timed (default: %(default)s)")
    p.add_argument("--latency-override", action="append", default=[], metavar="KEY=VALUE",
                   help="preset config override for the latency model (repeatable), e.g. llm.num_hidden_layers=2")
    p.add_argument("overrides", nargs="*", help="recipe overrides key=value (e.g. stages.1.max_steps=50)")


def run(args: argparse.Namespace) -> int:
    from edgevlm.model.integrators import INTEGRATORS

    names = INTEGRATORS.names() if args.integrators == "all" else [n.strip() for n in args.integrators.split(",")]
    for n in names:
        INTEGRATORS.get(n)  # unknown name -> error listing the valid ones
    if not Path(args.base, "config.json").is_file():
        raise EdgeVLMError(f"--base {args.base}: not a model dir (train one first: make demo)")
    recipe = _recipe_path(args.paradigm)
    args.kwargs_by_name = _parse_kwargs(args.kwargs)
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name}", file=sys.stderr, flush=True)
        try:
            rows.append(train_and_eval(name, recipe, args, out / "runs" / name))
        except EdgeVLMError as e:  # recorded; the other integrators still run (a rerun retries it)
            print(f"{name}: failed: {e}", file=sys.stderr)
            rows.append({"integrator": name, "error": str(e)[-600:]})
    latency = measure_latency(names, args, out) if args.latency != "none" else []
    write_study(out, rows, latency, args, recipe)
    return 0


def _recipe_path(paradigm: str) -> Path:
    path = Path(paradigm)
    if not path.suffix:
        path = paradigms_dir() / f"{paradigm}.yaml"
    if not path.is_file():
        valid = ", ".join(sorted(p.stem for p in paradigms_dir().glob("*.yaml")))
        raise EdgeVLMError(f"--paradigm {paradigm}: no such recipe; shipped: {valid}")
    return path


def _parse_kwargs(items: list[str]) -> dict[str, dict]:
    import yaml

    out = {k: yaml.safe_load(v) for k, v in DEFAULT_KWARGS.items()}
    for item in items:
        name, sep, raw = item.partition("=")
        value = yaml.safe_load(raw) if sep else None
        if not isinstance(value, dict):
            raise EdgeVLMError(f"--kwargs {item!r}: expected NAME={{key: value, ...}}")
        out[name.strip()] = value
    return out


def _data_overrides(recipe: Path, data: str) -> list[str]:
    """Point each stage at the same file name inside --data (captions.json / train.json)."""
    from edgevlm.train.recipe import load_recipe

    cfg = load_recipe(str(recipe))
    return [f"stages.{i}.data={Path(data) / Path(s.data).name}" for i, s in enumerate(cfg.stages)]


def train_and_eval(name: str, recipe: Path, args: argparse.Namespace, run_dir: Path) -> dict:
    """Train (unless done) and evaluate one integrator; returns its study row."""
    result = run_dir / "result.json"
    if result.is_file():
        return json.loads(result.read_text())
    over = [f"model={args.base}", f"output_dir={run_dir}", f"model_overrides.integrator={name}",
            f"threads={args.threads}", *_data_overrides(recipe, args.data), *args.overrides]
    if name in args.kwargs_by_name:
        over.append(f"model_overrides.integrator_kwargs={json.dumps(args.kwargs_by_name[name])}")
    t0 = time.perf_counter()
    _call([sys.executable, "-m", "edgevlm.cli", "train", "--recipe", str(recipe), *over], run_dir / "train.log")
    train_s = time.perf_counter() - t0
    eval_json = run_dir / "eval.json"
    _call([sys.executable, "-m", "edgevlm.cli", "eval", "--model", str(run_dir / "final"), "--data", args.data,
           "--split", "test", "--max-records", str(args.eval_records), "--json", str(eval_json)],
          run_dir / "eval.log")
    row = {"integrator": name, "train_seconds": round(train_s, 1), "stages": _stage_logs(run_dir),
           "eval": json.loads(eval_json.read_text()), **_model_facts(run_dir / "final")}
    result.write_text(json.dumps(row, indent=2))
    return row


def _call(cmd: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-1500:]
        raise EdgeVLMError(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}); log {log}:\n{tail}")


def _stage_logs(run_dir: Path) -> list[dict]:
    """Per stage: trainable parameters (by group), steps, seconds, samples/s, peak memory."""
    out = []
    for log in sorted(run_dir.glob("*/log.jsonl"), key=lambda p: p.stat().st_mtime):
        recs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        start = next(r for r in recs if r.get("event") == "start")
        end = next(r for r in recs if r.get("event") == "end")
        losses = [r["loss"] for r in recs if "loss" in r]
        out.append({"stage": start["stage"], "trainable_params": start["trainable_params"],
                    "trainable_by_group": start.get("trainable_by_group"), "steps": start["total_steps"],
                    "final_loss": losses[-1] if losses else None, "seconds": end["seconds"],
                    "samples_per_s": end["samples_per_s"], "peak_rss_mb": end["peak_rss_mb"],
                    "gpu_peak_mb": end.get("gpu_peak_mb")})
    return out


def _model_facts(model_dir: Path) -> dict:
    """Visual tokens and parameters at the tiny (trained) shape and at MobileVLM-1.7B shape."""
    import torch

    from edgevlm import load_model
    from edgevlm.model.config import preset_config
    from edgevlm.model.integrators import build_integrator, count_parameters

    m = load_model(model_dir)
    big = preset_config("mobilevlm-1.7b")
    with torch.device("meta"):
        integ = build_integrator(m.cfg.integrator, big.vision.hidden_size, big.llm.hidden_size, big.vision.grid,
                                 llm=big.llm)
    return {"kwargs": m.cfg.integrator.kwargs, "n_visual_tokens_tiny": m.n_visual_tokens,
            "integrator_params_tiny": m.parameter_counts()["integrator"],
            "n_visual_tokens_1p7b": integ.num_tokens(big.vision.num_features),
            "integrator_params_1p7b": count_parameters(integ)}


def measure_latency(names: list[str], args: argparse.Namespace, out: Path) -> list[dict]:
    """The benchmark suite's cases for these integrators at mobilevlm-1.7b shape."""
    import yaml

    backends: dict[str, list[str]] = {}
    for item in args.latency.split(","):
        backend, _, precision = item.strip().partition(":")
        backends.setdefault(backend, []).append(precision or "fp32")
    matrix = {"name": "study_integrators", "description": "integrator study latency, MobileVLM-1.7B shape",
              "defaults": {"images": 1, "prompt_tokens": 32, "new_tokens": 16, "threads": args.threads,
                           "warmup": 1, "runs": args.runs, "timeout_s": 1800, "export_timeout_s": 5400},
              "models": _latency_models(names, args), "backends": backends}
    path = out / "latency_matrix.yaml"
    path.write_text(yaml.safe_dump(matrix, sort_keys=False))
    results = out / "latency.jsonl"
    _call([sys.executable, "-m", "edgevlm.cli", "bench", "run", "--matrix", str(path), "--out", str(results),
           *(["--no-limits"] if args.no_limits else [])], out / "latency.log")
    from edgevlm.benchmarks.run import read_records

    latest = {r["id"]: r for r in read_records(results) if r.get("type") == "case"}
    return list(latest.values())


def _latency_models(names: list[str], args: argparse.Namespace) -> list[dict]:
    """One matrix model for the integrators at their defaults, one per integrator with kwargs."""
    from edgevlm.runtime.configio import parse_key_values

    given = parse_key_values(args.latency_override, what="--latency-override")
    base = {key.replace(".", "__"): value for key, value in given.items()}  # matrix keys use __
    plain = [n for n in names if n not in args.kwargs_by_name]
    models = [{"preset": args.latency_preset, "integrators": plain, "overrides": base}] if plain else []
    for n in names:
        if n in args.kwargs_by_name:
            models.append({"preset": args.latency_preset, "integrators": [n], "label": f"{args.latency_preset}-{n}",
                           "overrides": {**base, "integrator_kwargs": args.kwargs_by_name[n]}})
    return models


def write_study(out: Path, rows: list[dict], latency: list[dict], args: argparse.Namespace, recipe: Path) -> None:
    from edgevlm.benchmarks.environment import collect
    from edgevlm.benchmarks.report_render import render_html, render_md, write_plots
    from edgevlm.benchmarks.study_report import study_blocks

    doc = {"paradigm": recipe.stem if recipe.parent == paradigms_dir() else str(recipe),
           "base": args.base, "overrides": args.overrides, "eval_records": args.eval_records,
           "environment": collect(measure_limits=False), "integrators": rows, "latency": latency}
    (out / "study.json").write_text(json.dumps(doc, indent=2, default=str))
    blocks = study_blocks(doc)
    write_plots(blocks, out / "plots")
    (out / "study.md").write_text(render_md(blocks, "plots"))
    (out / "study.html").write_text(render_html(blocks, "edgevlm integrator study"))
    print(f"wrote {out / 'study.md'} and study.html (also: edgevlm bench report ... --study {out / 'study.json'})",
          file=sys.stderr)


if __name__ == "__main__":
    from edgevlm.cli import script_main

    script_main("bench", "study")
