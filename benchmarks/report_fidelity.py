"""The report's Fidelity section: fidelity records (``benchmarks/fidelity.py``) as a table per model,
best first, with the target each row should meet, and a KL-vs-size plot per backend."""
from __future__ import annotations

from edgevlm.benchmarks.fidelity import TARGETS, accuracy_drop, target_misses
from edgevlm.benchmarks.report_render import Block, fmt

HEADERS = ["target", "MB", "KL mean", "KL median", "KL p99", "same top", "RMS Δp", "max |Δlogit|",
           "vision cos min / mean", "same answers", "accuracy (fp32 ref)", "goal"]


def fidelity_blocks(records: list[dict]) -> list[Block]:
    if not records:
        return []
    blocks: list[Block] = [
        ("h2", "Measured: fidelity against PyTorch fp32"),
        ("p", "Teacher-forced on the fp32 reference's greedy answers to held-out ShapesVQA prompts (the "
              "prompts count and steps per answer are in each case id): per answer position, KL(p_ref || p_target) "
              "in nats, the share of positions where both pick the same top token, the RMS change in probability "
              "of the reference's token, the largest logit difference; vision-embedding cosine per visual token; "
              "'same answers' = prompts whose greedy answer is identical. llama.cpp's scoreboard has LLaMA-3-8B "
              "Q4_K_M at 91.9% same top and mean KL 0.031 vs f16. 'goal' checks the targets in "
              "benchmarks/fidelity.py; on random weights (presets) accuracy is not measured. Core ML predicts "
              "only on macOS and TensorRT only on a CUDA GPU: their rows appear where they ran.")]
    for model in dict.fromkeys(r["model"]["label"] for r in records):
        rows = sorted((r for r in records if r["model"]["label"] == model), key=lambda r: r["fidelity"]["kl_mean"])
        blocks += [("h3", f"{model}"), ("table", HEADERS, [_row(r) for r in rows])]
        pts = [{"series": r["backend"], "label": r["precision"], "size_mb": _size(r),
                "kl_mean": r["fidelity"]["kl_mean"]} for r in rows if _size(r)]
        if pts:
            from edgevlm.benchmarks import plots

            blocks.append(("img", f"fidelity_{_slug(model)}", plots.fidelity_vs_size(pts, f"Measured: KL vs size, {model}"),
                           f"Mean KL divergence vs artifact size, {model}"))
    return blocks


def _row(r: dict) -> list:
    f = r["fidelity"]
    vis = "-" if f.get("vision_cosine_min") is None else f"{f['vision_cosine_min']:.5f} / {f['vision_cosine_mean']:.5f}"
    acc, ref = (r.get("accuracy") or {}).get("accuracy"), (r.get("reference_accuracy") or {}).get("accuracy")
    accuracy = "-" if acc is None else f"{acc:.3f} ({ref:.3f}, drop {accuracy_drop(r):+.1f} pt)"
    misses = target_misses(r)
    goal = "no goal" if (r["backend"], r["precision"]) not in TARGETS else ("MISSED: " + "; ".join(misses)
                                                                           if misses else "met")
    return [f"{r['integrator'] or 'own'} {r['backend']} {r['precision']}", fmt(_size(r)), f"{f['kl_mean']:.3g}",
            f"{f['kl_median']:.3g}", f"{f['kl_p99']:.3g}", f"{f['same_top_token']:.1%}", f"{f['rms_dp']:.2%}",
            fmt(f["max_abs_logit_diff"]), vis, f["same_greedy_answer"], accuracy, goal]


def _size(r: dict) -> float | None:
    mb = r.get("artifact_mb") or {}
    return round(sum(v for k, v in mb.items() if k != "tokenizer"), 2) or None


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)
