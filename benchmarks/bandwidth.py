"""The host's memory read bandwidth, measured STREAM-style: stream a buffer much larger than the
last-level cache through a vectorised reduction, best of several passes, 1..N threads.

The decode of a small LLM reads every weight once per token, so ``bandwidth / bytes read per
token`` is an upper bound on its decode rate; the report shows each measured rate as a fraction of
that bound. Run by path for a one-off number: ``python benchmarks/bandwidth.py``.
"""
from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from edgevlm.runtime.hostcpu import usable_cpus

DEFAULT_MB = 512  # far beyond any L3 this runs on; small enough for a shared 2-core box


def _read_pass(pool: ThreadPoolExecutor | None, chunks: list[np.ndarray]) -> float:
    t = time.perf_counter()
    if pool is None:
        chunks[0].max()  # a pure read: SIMD compare, no stores; releases the GIL
    else:
        list(pool.map(np.max, chunks))
    return time.perf_counter() - t


def measure_read_bandwidth(size_mb: int = DEFAULT_MB, repeats: int = 5, max_threads: int | None = None) -> dict:
    """Best read bandwidth in GB/s (1e9 bytes/s) over thread counts 1..max_threads.

    Returns ``{"read_gbs": best, "by_threads": {n: GB/s}, "size_mb": ..., "method": ...}``.
    """
    if size_mb < 64:
        raise ValueError("size_mb must be >= 64 to defeat the caches")
    n_cpu = usable_cpus()
    max_threads = max(1, min(max_threads or n_cpu, n_cpu))
    buf = np.ones(size_mb * 2**20 // 8, dtype=np.float64)  # touch every page before timing
    by_threads: dict[int, float] = {}
    for n in range(1, max_threads + 1):
        chunks = np.array_split(buf, n)
        pool = ThreadPoolExecutor(n) if n > 1 else None
        try:
            _read_pass(pool, chunks)  # warm-up
            best = min(_read_pass(pool, chunks) for _ in range(repeats))
        finally:
            if pool is not None:
                pool.shutdown()
        by_threads[n] = round(buf.nbytes / best / 1e9, 2)
    return {"read_gbs": max(by_threads.values()), "by_threads": by_threads, "size_mb": size_mb,
            "repeats": repeats, "method": "numpy max() over a float64 buffer, best pass, 1..N threads"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=int, default=DEFAULT_MB)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="largest thread count to try (default: all cores)")
    args = p.parse_args(argv)
    print(json.dumps(measure_read_bandwidth(args.size_mb, args.repeats, args.threads), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
