"""Soak of ``edgevlm serve``: thousands of requests with mixed images (new, repeated, none), lengths,
streaming, sampling, response_format and logprobs from a few concurrent clients, the process's RSS
sampled throughout; after warm-up (the first quarter of the requests, which fills the caches and
thread pools) its slope must be ~0 and the threads and open file descriptors must not grow. The server runs in this process (uvicorn in a thread on
127.0.0.1), so RSS covers the server, the runtime and its caches.

    python benchmarks/serve_soak.py --requests 3000 --clients 4 --out runs/reliability/soak.json
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

SMALL = ["vision__num_hidden_layers=3", "llm__num_hidden_layers=2"]
QUESTIONS = ["What colour is the circle?", "Is there a square?", "How many shapes are there?",
             "Describe the picture in detail, every shape and its colour and where it is."]


@contextmanager
def served(bundle: Path | None, serve_args: list[str]):
    """The URL of ``edgevlm serve BUNDLE SERVE_ARGS`` in this process (a random tiny ONNX bundle
    built in a temporary directory when ``bundle`` is None)."""
    from edgevlm.cli import build_parser
    from edgevlm.runtime.serve.background import BackgroundServer
    from edgevlm.runtime.serve.cli import build

    with tempfile.TemporaryDirectory(prefix="edgevlm-reliability-") as tmp:
        if bundle is None:
            from edgevlm.benchmarks.serve_bench import build_bundle, parse_overrides

            bundle = build_bundle("tiny", parse_overrides(SMALL), "onnx", Path(tmp))
        args = build_parser("serve").parse_args(["serve", "--bundle", str(bundle), *serve_args])
        app, rt = build(args)
        try:
            with BackgroundServer(app) as server:
                yield server.url
        finally:
            rt.close()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def cache_mb(url: str) -> float:
    """The image-embedding cache's size (it fills up to --image-cache-mb: growth, not a leak)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    line = next(x for x in text.splitlines() if x.startswith("edgevlm_image_cache_bytes "))
    return float(line.split()[1]) / 2**20


def image_uri(seed: int) -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    size = (int(rng.integers(32, 400)), int(rng.integers(32, 400)))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(buf, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"


def request_body(i: int, rng: random.Random, images: list[str]) -> dict:
    """The i-th request: a new or repeated image or none, 1..48 tokens, some streamed / sampled /
    constrained / with logprobs."""
    content: list = [{"type": "text", "text": rng.choice(QUESTIONS)}]
    pick = rng.random()
    if pick < 0.3:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_uri(10_000 + i)}})
    elif pick < 0.7:
        content.insert(0, {"type": "image_url", "image_url": {"url": rng.choice(images)}})
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": rng.choice([1, 4, 16, 48]),
            "stream": rng.random() < 0.4}
    if rng.random() < 0.3:
        body.update(temperature=0.8, seed=i)
    if rng.random() < 0.1:
        body["response_format"] = {"type": "json_object"}
    if rng.random() < 0.1:
        body.update(logprobs=True, top_logprobs=2)
    return body


def soak(url: str, n: int, clients: int, seed: int = 0, sample_every_s: float = 1.0) -> dict:
    images = [image_uri(s) for s in range(8)]
    samples: list[tuple[float, float, int, float]] = []  # (seconds, RSS MB, requests done, image cache MB)
    done, statuses, lock, stop = [0], {}, threading.Lock(), threading.Event()
    warm: dict = {}  # threads, fds and RSS when a quarter of the requests are done (pools filled)
    t0 = time.perf_counter()

    def sampler():
        while not stop.wait(sample_every_s):
            samples.append((time.perf_counter() - t0, rss_mb(), done[0], cache_mb(url)))
            if not warm and done[0] >= n // 4:
                warm.update(threads=threading.active_count(), fds=open_fds(), rss_mb=samples[-1][1])

    def client(k: int):
        rng = random.Random(seed * 1000 + k)
        with httpx.Client(timeout=120) as http:
            for i in range(k, n, clients):
                body = request_body(i, rng, images)
                if body["stream"]:
                    with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                        for _ in r.iter_lines():
                            pass
                        status = r.status_code
                else:
                    status = http.post(f"{url}/v1/chat/completions", json=body).status_code
                with lock:
                    statuses[str(status)] = statuses.get(str(status), 0) + 1
                    done[0] += 1

    before = {"threads": threading.active_count(), "fds": open_fds(), "rss_mb": rss_mb()}
    watcher = threading.Thread(target=sampler, daemon=True)
    watcher.start()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    stop.set()
    watcher.join()
    time.sleep(1.0)  # keep-alive connections closed, handler threads back in their pools
    after = {"threads": threading.active_count(), "fds": open_fds(), "rss_mb": rss_mb()}
    return {"requests": n, "clients": clients, "seconds": round(time.perf_counter() - t0, 1), "statuses": statuses,
            "before": before, "warm": warm, "after": after, **rss_slope(samples, n)}


def rss_slope(samples: list[tuple[float, float, int, float]], n: int) -> dict:
    """RSS growth per 1000 requests after warm-up (the first quarter of the requests), by least
    squares; also of RSS less the image cache (which grows until --image-cache-mb is reached)."""
    warm = [(done, mb, cache) for _, mb, done, cache in samples if done >= n // 4]
    if len(warm) < 3:
        return {"rss_slope_mb_per_1k": None, "rss_samples": len(samples)}
    x, y, c = (np.array(v, float) for v in zip(*warm))
    slope = lambda v: round(float(np.polyfit(x, v, 1)[0]) * 1000, 3)  # noqa: E731
    half = x >= np.median(x)
    return {"rss_slope_mb_per_1k": slope(y), "rss_less_cache_slope_mb_per_1k": slope(y - c),
            "rss_slope_second_half_mb_per_1k": round(float(np.polyfit(x[half], y[half], 1)[0]) * 1000, 3),
            "rss_after_warmup_mb": [round(y.min(), 1), round(y.max(), 1)],
            "image_cache_mb": [round(c.min(), 1), round(c.max(), 1)], "rss_samples": len(samples)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=None, help="a bundle to serve (default: a random tiny ONNX one)")
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    with served(args.bundle, ["--threads", "1", "--max-queue", str(args.clients)]) as url:
        report = soak(url, args.requests, args.clients, args.seed)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    bad = [s for s in report["statuses"] if s != "200"]
    leaked = report["after"]["threads"] > report["warm"].get("threads", 0) or \
        report["after"]["fds"] > report["warm"].get("fds", 0)
    return 1 if bad or leaked or (report.get("rss_less_cache_slope_mb_per_1k") or 0) > 5 else 0


if __name__ == "__main__":
    raise SystemExit(main())
