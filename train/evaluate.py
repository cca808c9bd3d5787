"""Exact-match accuracy per question type, beside the majority-answer baseline per type.

Example: edgevlm eval --model runs/tiny/final --data data/shapes --split test --json eval.json

Each type also reports its most frequent prediction and that prediction's share: a model that
gives one answer to every question of a type (a share of 1.0) has learned only the prior, whatever
its accuracy. ``--predictions FILE`` writes every question, answer and prediction as JSON lines.
"""
from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm


def normalize(answer: str) -> str:
    return re.sub(r"[\s.!?]+$", "", answer.strip().lower())


def majority_answers(records) -> dict[str, str]:
    """Most frequent answer per question type (the baseline a blind model could reach)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for rec in records:
        for (_, a), meta in zip(rec.turns, rec.qa_meta):
            counts[meta.get("type", "all")][normalize(a)] += 1
    return {t: c.most_common(1)[0][0] for t, c in counts.items()}


def score(records, answer_fn: Callable, majority: dict[str, str], progress: bool = True,
          predictions: list | None = None) -> dict:
    """``answer_fn(record, question) -> text``; scores the first QA pair of each record. With a
    ``predictions`` list, appends one dict per question to it (id, type, question, answer,
    prediction, correct)."""
    per: dict[str, dict] = defaultdict(lambda: {"n": 0, "correct": 0, "baseline_correct": 0,
                                                "predicted": Counter()})
    small = {"n": 0, "correct": 0}
    for rec in tqdm(records, desc="eval", disable=not progress):
        (q, a), meta = rec.turns[0], (rec.qa_meta[0] if rec.qa_meta else {})
        kind = meta.get("type", "all")
        pred, gold = normalize(answer_fn(rec, q)), normalize(a)
        ok = pred == gold
        if predictions is not None:
            predictions.append({"id": rec.id, "type": kind, "question": q, "answer": a,
                                "prediction": pred, "correct": ok})
        row = per[kind]
        row["n"] += 1
        row["correct"] += ok
        row["predicted"][pred] += 1
        row["baseline_correct"] += majority.get(kind) == gold
        if meta.get("small"):
            small["n"] += 1
            small["correct"] += ok
            row["small_n"] = row.get("small_n", 0) + 1
            row["small_correct"] = row.get("small_correct", 0) + ok
    result = {k: _rates(v) for k, v in sorted(per.items())}
    total = {k: sum(v[k] for v in per.values()) for k in ("n", "correct", "baseline_correct")}
    out = {"per_type": result, "overall": _rates(total)}
    if small["n"]:
        out["small_objects"] = {"n": small["n"], "accuracy": round(small["correct"] / small["n"], 4)}
    return out


def _rates(v: dict) -> dict:
    n = max(1, v["n"])
    out = {"n": v["n"], "accuracy": round(v["correct"] / n, 4),
           "majority_baseline": round(v["baseline_correct"] / n, 4)}
    if v.get("predicted"):  # the most frequent prediction: a share of 1.0 means a constant answer
        top, count = v["predicted"].most_common(1)[0]
        out["top_prediction"] = {"answer": top, "share": round(count / n, 4)}
    if v.get("small_n"):  # questions about a small object, and the rest, scored apart
        big_n = v["n"] - v["small_n"]
        out["small"] = {"n": v["small_n"], "accuracy": round(v["small_correct"] / v["small_n"], 4)}
        out["not_small"] = {"n": big_n, "accuracy": round((v["correct"] - v["small_correct"]) / max(1, big_n), 4)}
    return out


def format_table(result: dict) -> str:
    lines = [f"{'type':<12}{'n':>6}{'accuracy':>10}{'majority':>10}  most frequent prediction (share)"]
    for kind, r in list(result["per_type"].items()) + [("overall", result["overall"])]:
        top = r.get("top_prediction")
        top_text = f"  {top['answer'][:24]!r} ({top['share']:.2f})" if top else ""
        lines.append(f"{kind:<12}{r['n']:>6}{r['accuracy']:>10.3f}{r['majority_baseline']:>10.3f}{top_text}")
    if "small_objects" in result:
        s = result["small_objects"]
        lines.append(f"{'(small obj)':<12}{s['n']:>6}{s['accuracy']:>10.3f}")
    return "\n".join(lines)


def evaluate_model(model, data_dir: str, split: str = "test", max_records: int = 0, progress: bool = True,
                   predictions: list | None = None) -> dict:
    """``model``: anything with ``generate(image=, prompt=, max_new_tokens=)`` (an EdgeVLM or a ``Runtime``)."""
    from edgevlm.train.data.llava import load_llava_records, load_record_image

    records = _load_split(data_dir, split, max_records)
    train_json = Path(data_dir) / "train.json"
    basis = load_llava_records(str(train_json)).records if train_json.is_file() else records
    answer = lambda rec, q: model.generate(image=load_record_image(rec), prompt=q, max_new_tokens=12).text  # noqa: E731
    return score(records, answer, majority_answers(basis), progress, predictions)


def _load_split(data_dir: str, split: str, max_records: int):
    from edgevlm.train.data.llava import load_llava_records

    recs = load_llava_records(str(Path(data_dir) / f"{split}.json")).records
    return recs[:max_records] if max_records else recs


def add_arguments(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="model dir or preset (PyTorch)")
    which.add_argument("--bundle", help="an exported bundle, answered through the on-device runtime")
    p.add_argument("--backend", default=None, help="runtime backend for --bundle (default: the bundle's own)")
    p.add_argument("--data", default="data/shapes", help="dataset folder with {split}.json (default: %(default)s)")
    p.add_argument("--split", default="test")
    p.add_argument("--max-records", type=int, default=0)
    p.add_argument("--json", help="also write the result as JSON here")
    p.add_argument("--predictions", metavar="JSONL",
                   help="also write every question, its answer and the prediction here (one JSON object per line)")


def run(args: argparse.Namespace) -> int:
    predictions: list | None = [] if args.predictions else None
    if args.bundle:
        from edgevlm.runtime import Runtime

        with Runtime.load(args.bundle, backend=args.backend) as rt:
            result = evaluate_model(rt, args.data, args.split, args.max_records, predictions=predictions)
            result["backend"] = rt.backend.name
        result["bundle"] = str(args.bundle)
    else:
        from edgevlm import load_model

        result = evaluate_model(load_model(args.model), args.data, args.split, args.max_records,
                                predictions=predictions)
        result["model"] = str(args.model)
    result["split"] = args.split
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if predictions is not None:
        Path(args.predictions).write_text("".join(json.dumps(p) + "\n" for p in predictions))
    return 0


if __name__ == "__main__":
    from edgevlm.cli import script_main

    script_main("eval")
