"""Markdown for the integrator study (benchmarks/study_integrators.py): accuracy per question type,
training cost, 1.7B-shape latency per backend, and an accuracy-vs-TTFT Pareto chart per backend."""
from __future__ import annotations

from edgevlm.benchmarks.report_render import fmt, med

QA_TYPES = ("colour", "shape", "count", "position", "existence", "text")


def _acc(ev: dict, kind: str) -> str:
    r = ev["per_type"].get(kind)
    return "-" if r is None else f"{r['accuracy']:.2f}"


def _small(ev: dict, kind: str | None = None) -> str:
    if kind is None:
        s = ev.get("small_objects")
        return "-" if not s else f"{s['accuracy']:.2f} (n={s['n']})"
    r = ev["per_type"].get(kind) or {}
    if "small" not in r:
        return "-"
    return f"{r['small']['accuracy']:.2f} / {r['not_small']['accuracy']:.2f}"


def accuracy_rows(rows: list[dict]) -> list[list]:
    out = []
    for r in rows:
        ev = r["eval"]
        out.append([f"`{r['integrator']}`", r["n_visual_tokens_tiny"], r["n_visual_tokens_1p7b"],
                    f"{r['integrator_params_1p7b'] / 1e6:.2f}M", *(_acc(ev, k) for k in QA_TYPES),
                    _small(ev), f"**{ev['overall']['accuracy']:.3f}**"])
    return out


def cost_rows(rows: list[dict]) -> list[list]:
    out = []
    for r in rows:
        stages = r.get("stages") or []
        out.append([f"`{r['integrator']}`",
                    " + ".join(f"{s['stage']} {s['trainable_params'] / 1e6:.2f}M" for s in stages),
                    " + ".join(str(s["steps"]) for s in stages), f"{r['train_seconds']:.0f}",
                    " / ".join(f"{s['samples_per_s']:.1f}" for s in stages),
                    f"{max((s['peak_rss_mb'] for s in stages), default=0):.0f}"])
    return out


def latency_rows(latency: list[dict]) -> list[list]:
    out = []
    for c in sorted(latency, key=lambda c: (c["backend"], c["integrator"] or "")):
        if c["status"] != "ok":
            out.append([f"`{c['integrator']}`", f"{c['backend']} {c['precision']}", c["status"],
                        (c.get("reason") or c.get("error") or "")[:120], "-", "-"])
            continue
        out.append([f"`{c['integrator']}`", f"{c['backend']} {c['precision']}", c.get("n_visual_tokens"),
                    fmt(med(c, "ttft_ms")), fmt(med(c, "decode_tok_s")), fmt(c.get("peak_rss_mb"))])
    return out


def pareto_points(rows: list[dict], latency: list[dict]) -> dict[str, list[dict]]:
    """backend/precision -> [{label, ttft_ms, accuracy}] for integrators with both numbers."""
    acc = {r["integrator"]: r["eval"]["overall"]["accuracy"] for r in rows}
    out: dict[str, list[dict]] = {}
    for c in latency:
        if c["status"] == "ok" and c["integrator"] in acc and med(c, "ttft_ms"):
            out.setdefault(f"{c['backend']} {c['precision']}", []).append(
                {"label": c["integrator"], "ttft_ms": med(c, "ttft_ms"), "accuracy": acc[c["integrator"]]})
    return out


def study_blocks(doc: dict) -> list:
    """Report blocks (see benchmarks/report.py) for a study.json document."""
    from edgevlm.benchmarks import plots
    from edgevlm.benchmarks.environment import summary_line

    failed = [r for r in doc["integrators"] if "error" in r]
    rows, latency = [r for r in doc["integrators"] if "error" not in r], doc["latency"]
    blocks = [
        ("h2", "Integrator study: accuracy vs latency"),
        ("p", f"Paradigm `{doc['paradigm']}` from `{doc['base']}` (fresh integrator, same seed and budget for "
              f"each; overrides: {' '.join(doc['overrides']) or 'none'}); {doc['eval_records']} held-out test "
              "questions per integrator (exact match). Environment: " + summary_line(doc["environment"]) + "."),
        ("p", "Caveat: the base model's vision tower was trained together with its own integrator, which "
              "favours that integrator; accuracies come from a tiny from-scratch model and a short budget, so "
              "read them as a comparison under equal conditions, not as what each design reaches."),
        ("h3", "Held-out accuracy per question type"),
        ("table", ["integrator", "tokens (tiny)", "tokens (1.7B)", "params (1.7B)", *QA_TYPES, "small objects",
                   "overall"], accuracy_rows(rows)),
        ("p", "Small-object vs other questions per type (small / not small):"),
        ("table", ["integrator", *QA_TYPES], [[f"`{r['integrator']}`", *(_small(r["eval"], k) for k in QA_TYPES)]
                                              for r in rows])]
    if failed:
        blocks.append(("p", "Failed (rerun the study to retry): " + "; ".join(
            f"`{r['integrator']}`: {r['error'].splitlines()[0][:200]}" for r in failed)))
    blocks += [("h3", "Training cost (tiny shape)"),
               ("table", ["integrator", "trainable params per stage", "steps", "train s", "samples/s",
                          "peak RSS MB"], cost_rows(rows))]
    if latency:
        blocks += [("h3", "Measured: latency at the study's latency shape (random weights)"),
                   ("table", ["integrator", "backend", "visual tokens", "TTFT ms", "decode tok/s", "peak RSS MB"],
                    latency_rows(latency))]
    for name, pts in pareto_points(rows, latency).items():
        key = "study_pareto_" + name.replace(" ", "_")
        blocks.append(("img", key, plots.pareto(pts, title=f"Measured: accuracy vs TTFT ({name})"),
                       f"accuracy vs TTFT, {name}"))
    return blocks
