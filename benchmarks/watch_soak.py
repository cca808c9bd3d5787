"""Soak ``edgevlm watch``: a long synthetic ShapesVQA video, every frame answered, RSS sampled.

Example:
    python benchmarks/watch_soak.py --bundle BUNDLE --frames 15000 --out benchmarks/results/watch/soak_tiny.json

Writes (``--out``; the curve as ``.png`` beside it) the RSS curve (resident set size every
``--sample-every`` answers), its slope after warm-up (least squares over the answers after ``--warmup``,
MB per 1,000 answers; the goal is < 1), the sustained answer rate, the per-answer latency percentiles
(the generation's total: vision + prefill + decode; the first answer, the session's warm-up, left out)
and the host. With ``--answers N`` only the first N frames are asked (a throughput run on a big model).
A corner block of the video changes every frame (``write_video(ticker=True)``), so the vision encoder
runs for (nearly: lossy coding makes a few frames alike) every answer and the image cache fills to its
bound, which is part of what the soak checks.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def slope_per_1000(points: list[tuple[int, float]], warmup: int) -> float | None:
    """Least-squares slope of RSS (MB) against answers, per 1,000 answers, after ``warmup`` answers."""
    pts = [(n, mb) for n, mb in points if n >= warmup]
    if len(pts) < 3:
        return None
    x, y = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)
    return float(np.polyfit(x, y, 1)[0] * 1000)


def soak(bundle: str, video: str, prompt: str, answers: int | None, sample_every: int, threads: int,
         max_new_tokens: int, image_cache_mb: float) -> dict:
    from edgevlm.runtime import Runtime

    curve, lat = [], []
    stages = {"vision_ms": 0.0, "prefill_ms": 0.0, "ttft_ms": 0.0}
    t_start = None
    with Runtime.load(bundle, threads=threads, prefix_reuse=True, image_cache_mb=image_cache_mb) as rt:
        curve.append((0, rss_mb()))
        for n, r in enumerate(rt.watch(video, prompt, max_new_tokens=max_new_tokens, max_answers=answers), 1):
            if t_start is None:
                t_start = time.perf_counter()  # the first answer (session warm-up) is not in the rate
            else:
                lat.append(r.timings["total_ms"])  # vision + prefill + decode of this answer
                for k in stages:
                    stages[k] += r.timings[k]
            if n % sample_every == 0:
                curve.append((n, round(rss_mb(), 2)))
        elapsed = time.perf_counter() - t_start
        cache = rt.caches.images
        cache_info = None if cache is None else {"bytes": cache.n_bytes, "max_bytes": cache.max_bytes,
                                                 "entries": len(cache), "hits": cache.hits, "misses": cache.misses}
    q = statistics.quantiles(lat, n=100) if len(lat) > 2 else [float("nan")] * 99
    return {"answers": n, "answers_per_s": (n - 1) / elapsed if elapsed > 0 else None,
            "latency_ms": {"mean": statistics.fmean(lat) if lat else None, "p50": q[49], "p90": q[89], "p99": q[98],
                           **{f"mean_{k}": v / max(len(lat), 1) for k, v in stages.items()}},
            "rss_curve": curve, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "image_cache": cache_info}


def plot_curve(result: dict, out: Path) -> None:
    """The RSS curve with the fitted slope, as a PNG beside the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, mb = zip(*result["rss_curve"])
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(n, mb, marker=".", lw=1)
    ax.axvline(result["warmup_answers"], color="grey", ls=":", label="warm-up ends")
    slope = result["slope_mb_per_1000_answers"]
    ax.set(xlabel="answers", ylabel="RSS (MB)",
           title=f"watch soak: {slope:+.2f} MB per 1,000 answers after warm-up" if slope is not None else "")
    ax.title.set_fontsize(10)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--frames", type=int, default=15000, help="frames in the synthetic video")
    p.add_argument("--answers", type=int, default=None, help="stop after this many answers (default: all frames)")
    p.add_argument("--side", type=int, default=64, help="frame side (the model resizes to its own)")
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--hold", type=float, default=2.0, help="seconds per colour")
    p.add_argument("--sample-every", type=int, default=100, help="answers between RSS samples")
    p.add_argument("--warmup", type=int, default=None, help="answers before the slope is fitted (default: 20%%)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--image-cache-mb", type=float, default=64.0)
    p.add_argument("--out", required=True, help="JSON result")
    args = p.parse_args(argv)
    from edgevlm.train.data.shapes_video import write_video

    with tempfile.TemporaryDirectory() as tmp:
        video = str(Path(tmp) / "soak.mp4")
        info = write_video(video, args.frames / args.fps, args.fps, args.hold, side=args.side, ticker=True)
        result = soak(args.bundle, video, info["question"], args.answers, args.sample_every, args.threads,
                      args.max_new_tokens, args.image_cache_mb)
    warmup = args.warmup if args.warmup is not None else result["answers"] // 5
    result.update(slope_mb_per_1000_answers=slope_per_1000(result["rss_curve"], warmup), warmup_answers=warmup,
                  bundle=args.bundle, video={k: info[k] for k in ("frames", "fps", "side", "hold_s")},
                  threads=args.threads, max_new_tokens=args.max_new_tokens,
                  host={"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
                  command="python benchmarks/watch_soak.py " + " ".join(argv if argv is not None else os.sys.argv[1:]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    plot_curve(result, Path(args.out).with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if k != "rss_curve"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
