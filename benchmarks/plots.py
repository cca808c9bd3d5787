"""The report's figures (matplotlib, Agg): each function takes plain rows and returns PNG bytes.

Measured figures and projected figures are drawn by different functions and titled
"measured" / "projected" so that a figure never mixes the two.
"""
from __future__ import annotations

import io
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"vision": "#8172B3", "tower": "#4C72B0", "integrator": "#DD8452", "prefill": "#55A868",
          "other": "#BBBBBB", "edgevlm": "#4C72B0", "peer": "#C44E52"}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _height(n: int) -> float:
    return max(2.5, 0.38 * n + 1.2)


def ttft_breakdown(rows: Sequence[dict]) -> bytes:
    """Stacked horizontal bars: tower / integrator / prefill / other per case (measured medians).
    Rows: label, ttft_ms, prefill_ms, and either tower_ms + integrator_ms or vision_ms."""
    fig, ax = plt.subplots(figsize=(9, _height(len(rows))))
    labels = [r["label"] for r in rows]
    for i, r in enumerate(rows):
        left = 0.0
        if r.get("tower_ms") is not None and r.get("integrator_ms") is not None:
            parts = [("tower", r["tower_ms"]), ("integrator", r["integrator_ms"])]
        else:
            parts = [("vision", r.get("vision_ms") or 0.0)]
        parts.append(("prefill", r.get("prefill_ms") or 0.0))
        parts.append(("other", max(0.0, r["ttft_ms"] - sum(v for _, v in parts))))
        for name, value in parts:
            ax.barh(i, value, left=left, color=COLORS[name], edgecolor="white",
                    label=name if name not in ax.get_legend_handles_labels()[1] else None)
            left += value
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("time to first token, ms (median)")
    ax.set_title("Measured: time to first token by stage", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="stage", title_fontsize=8)
    return _png(fig)


def grouped_bars(rows: Sequence[dict], metric: str, xlabel: str, title: str) -> bytes:
    """One bar per row, grouped by ``group`` (e.g. integrator), coloured by ``series`` (backend)."""
    groups = list(dict.fromkeys(r["group"] for r in rows))
    series = list(dict.fromkeys(r["series"] for r in rows))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(groups) * max(1, len(series)) ** 0.5 + 4), 4))
    cmap = plt.get_cmap("tab10")
    for j, s in enumerate(series):
        xs, ys, errs = [], [], [[], []]
        for i, g in enumerate(groups):
            r = next((r for r in rows if r["group"] == g and r["series"] == s), None)
            if r is None or r.get(metric) is None:
                continue
            xs.append(i + (j - (len(series) - 1) / 2) * width)
            ys.append(r[metric])
            errs[0].append(max(0.0, r[metric] - r.get(metric + "_p10", r[metric])))
            errs[1].append(max(0.0, r.get(metric + "_p90", r[metric]) - r[metric]))
        ax.bar(xs, ys, width, yerr=errs, capsize=2, label=s, color=cmap(j % 10))
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="backend precision", title_fontsize=8)
    return _png(fig)


def horizontal_bars(rows: Sequence[dict], metric: str, xlabel: str, title: str, color: str = "#4C72B0") -> bytes:
    fig, ax = plt.subplots(figsize=(9, _height(len(rows))))
    ax.barh(range(len(rows)), [r[metric] for r in rows],
            color=[COLORS["peer"] if r.get("peer") else color for r in rows])
    ax.set_yticks(range(len(rows)), [r["label"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    return _png(fig)


def pareto(rows: Sequence[dict], title: str = "Measured: accuracy vs time to first token") -> bytes:
    """Accuracy vs TTFT (measured), the Pareto front (lower TTFT, higher accuracy) joined."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["ttft_ms"], r["accuracy"], s=30)
        ax.annotate(r["label"], (r["ttft_ms"], r["accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front, best = [], -1.0
    for r in sorted(rows, key=lambda r: (r["ttft_ms"], -r["accuracy"])):
        if r["accuracy"] > best:
            front.append(r)
            best = r["accuracy"]
    ax.plot([r["ttft_ms"] for r in front], [r["accuracy"] for r in front], "k--", lw=1, label="Pareto front")
    ax.set_xlabel("TTFT, ms (median)")
    ax.set_ylabel("held-out exact-match accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _png(fig)


def projected_devices(rows: Sequence[dict]) -> bytes:
    """Projected decode tok/s and TTFT per device for each configuration (log scales)."""
    devices = list(dict.fromkeys(r["device"] for r in rows))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, max(3.0, 0.45 * len(devices) + 1.5)), sharey=True)
    cmap = plt.get_cmap("tab10")
    h = 0.8 / max(1, len(configs))
    for ax, metric, label in ((axes[0], "ttft_ms", "TTFT, ms (log)"), (axes[1], "decode_tok_s", "decode tok/s (log)")):
        for j, c in enumerate(configs):
            ys, vals = [], []
            for i, d in enumerate(devices):
                r = next((r for r in rows if r["device"] == d and r["config"] == c), None)
                if r is not None:
                    ys.append(i + (j - (len(configs) - 1) / 2) * h)
                    vals.append(r[metric])
            ax.barh(ys, vals, h, label=c, color=cmap(j % 10))
        ax.set_xscale("log")
        ax.set_xlabel(label)
    axes[0].set_yticks(range(len(devices)), devices, fontsize=8)
    axes[0].invert_yaxis()
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle("Projected (roofline x efficiency; not measured) per target device", fontsize=10)
    return _png(fig)


def fidelity_vs_size(rows: Sequence[dict], title: str = "Measured: KL divergence vs artifact size") -> bytes:
    """Mean KL(p_ref || p_target) (log scale) against artifact MB, one line per backend.
    Rows: series (backend), label (precision), size_mb, kl_mean."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for series in dict.fromkeys(r["series"] for r in rows):
        pts = sorted((r for r in rows if r["series"] == series), key=lambda r: r["size_mb"])
        ax.plot([r["size_mb"] for r in pts], [max(r["kl_mean"], 1e-12) for r in pts], "o-", label=series)
        for r in pts:
            ax.annotate(r["label"], (r["size_mb"], max(r["kl_mean"], 1e-12)), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("artifact size, MB (LLM + vision)")
    ax.set_ylabel("mean KL(p_fp32 || p_target), nats")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _png(fig)
