"""Serving speed of ``edgevlm serve``: time to first token, decode speed and request latency at 1, 2
and 4 concurrent clients, first question about an image vs the follow-up (image cache + KV prefix).

Example (the README's table):
    python benchmarks/serve_bench.py --model tiny --target gguf --backend llamacpp --threads 2 \\
        --out runs/bench/serve.json

Each client runs ``--rounds`` conversations: a new image, a first question, then a follow-up about
the same image with the first answer in the history; every request is streamed. TTFT is measured
by the client (request sent -> first text chunk), so under concurrency it includes waiting in the
server's queue; ``server_ttft`` is the runtime's own (vision + prefill + first token). Decode tok/s
is the server's. The server runs in this process on 127.0.0.1 (uvicorn in a thread), one request at
a time; with several clients a follow-up may find another conversation in the KV cache (the image
cache still hits). ``--no-cache`` serves without the image cache and prefix reuse, for the baseline.

``--compare-llama-cpp-server`` (GGUF bundles; needs llama-cpp-python's ``[server]`` extra) also
serves the bundle's LLM with ``llama_cpp.server`` and sends the same text-only prompt to both, one
request at a time: decode tok/s measured by the client the same way for both, (tokens of a long
answer - tokens of an 8-token answer) / (median time of the long - of the short request).
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

FIRST = "What colour is the circle?"
FOLLOW_UP = "And is there a square next to it?"


def parse_overrides(items: list[str]) -> dict:
    """``["llm__num_hidden_layers=6", ...]`` -> load_model keyword overrides (numbers parsed)."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def build_bundle(preset: str, overrides: dict, target: str, out: Path) -> Path:
    from edgevlm import load_model

    model = load_model(preset, **overrides).float().eval()
    if target == "gguf":
        from edgevlm.export.to_gguf import export_gguf

        return export_gguf(model, out / "gguf", ["f16"], progress=False)
    from edgevlm.export.to_onnx import export_onnx

    return export_onnx(model, out / "onnx", exporter="torchscript", token_check=0, progress=False)


def image_uri(seed: int) -> str:
    import numpy as np
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (240, 320, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def ask(url: str, model: str, messages: list, max_tokens: int) -> dict:
    """One streamed request: client TTFT and latency, the answer, the server's timings."""
    import httpx

    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0, ttft, text, timings = time.perf_counter(), None, "", {}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            delta = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            if delta and ttft is None:
                ttft = time.perf_counter() - t0
            text += delta or ""
            timings = chunk.get("timings", timings)
    return {"ttft_s": ttft, "latency_s": time.perf_counter() - t0, "text": text, **timings}


def conversation(url: str, model: str, seed: int, max_tokens: int) -> tuple[dict, dict]:
    user1 = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_uri(seed)}},
                                         {"type": "text", "text": FIRST}]}
    first = ask(url, model, [user1], max_tokens)
    history = [user1, {"role": "assistant", "content": first["text"]}, {"role": "user", "content": FOLLOW_UP}]
    return first, ask(url, model, history, max_tokens)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def summarise(rows: list[dict]) -> dict:
    def stats(key: str, scale: float = 1.0) -> dict:
        vals = [r[key] * scale for r in rows if r.get(key) is not None]
        return {"p50": pct(vals, 0.5), "p95": pct(vals, 0.95)} if vals else {}

    return {"n": len(rows), "ttft_ms": stats("ttft_s", 1e3), "server_ttft_ms": stats("ttft_ms"),
            "latency_ms": stats("latency_s", 1e3), "decode_tok_s": stats("decode_tok_s"),
            "images_cached": sum(r.get("images_cached", 0) for r in rows),
            "prefix_reused_mean": statistics.mean(r.get("prefix_reused", 0) for r in rows)}


def run_level(url: str, model: str, clients: int, rounds: int, max_tokens: int, seed0: int) -> dict:
    def client(i: int) -> list[tuple[dict, dict]]:
        return [conversation(url, model, seed0 + i * rounds + k, max_tokens) for k in range(rounds)]

    with ThreadPoolExecutor(clients) as pool:
        pairs = [p for ps in pool.map(client, range(clients)) for p in ps]
    first, follow = summarise([a for a, _ in pairs]), summarise([b for _, b in pairs])
    ratio = follow["ttft_ms"]["p50"] / first["ttft_ms"]["p50"] if first["ttft_ms"] else None
    return {"clients": clients, "first": first, "follow_up": follow, "follow_up_ttft_ratio_p50": ratio}


def timed_completion(url: str, model: str, prompt: str, max_tokens: int) -> tuple[int, float]:
    """(completion tokens, seconds) of one non-streamed text-only request."""
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0}
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"], time.perf_counter() - t0


def decode_rate(url: str, model: str, prompt: str, max_tokens: int, repeats: int) -> float:
    """Client-side decode tok/s: extra tokens / extra time of a long vs a short answer to the same
    prompt (greedy, so the long one continues the short one); prefill and HTTP cancel out."""
    short = [timed_completion(url, model, prompt, 8) for _ in range(repeats)]
    long = [timed_completion(url, model, prompt, max_tokens) for _ in range(repeats)]
    n_short, n_long = short[0][0], long[0][0]
    extra_s = statistics.median(t for _, t in long) - statistics.median(t for _, t in short)
    return (n_long - n_short) / extra_s if n_long > n_short and extra_s > 0 else float("nan")


def compare_llama_cpp_server(ours_url: str, bundle: Path, threads: int | None, n: int, max_tokens: int) -> dict:
    """Decode tok/s of edgevlm serve vs llama_cpp.server on the bundle's LLM (text-only prompts)."""
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    from edgevlm.runtime.backends.llamacpp import bundle_files
    from edgevlm.runtime.hostcpu import resolve_threads
    from edgevlm.runtime.manifest import read_manifest
    from edgevlm.runtime.serve.background import BackgroundServer

    llm, _, quant = bundle_files(bundle, read_manifest(bundle), None)
    n = resolve_threads(threads)  # what edgevlm serve --threads gives llama.cpp
    settings = ModelSettings(model=str(llm), model_alias="bench", n_threads=n, n_threads_batch=n,
                             chat_format="vicuna", verbose=False)
    prompt = "Tell me about the shapes in a long answer."
    out = {"quant": quant, "prompt": prompt, "max_tokens": max_tokens, "requests": n}
    with BackgroundServer(create_app(server_settings=ServerSettings(), model_settings=[settings])) as theirs:
        for name, url in (("edgevlm_serve", ours_url), ("llama_cpp_server", theirs.url)):
            timed_completion(url, "bench", prompt, 8)  # warm-up
            out[name] = decode_rate(url, "bench", prompt, max_tokens, n)
    out["ratio"] = out["edgevlm_serve"] / out["llama_cpp_server"]
    return out


def serve_args(args, bundle: Path) -> argparse.Namespace:
    from edgevlm.cli import build_parser

    argv = ["serve", "--bundle", str(bundle), "--model-name", "bench", "--max-queue", "64"]
    if args.backend:
        argv += ["--backend", args.backend]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.no_cache:
        argv += ["--image-cache-mb", "0", "--no-prefix-reuse"]
    return build_parser("serve").parse_args(argv)


def print_table(results: list[dict]) -> None:
    print("| clients | TTFT first p50 / p95 (ms) | TTFT follow-up p50 / p95 (ms) | follow-up / first | "
          "decode tok/s p50 | latency first p50 / p95 (ms) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        f, u = r["first"], r["follow_up"]
        print(f"| {r['clients']} | {f['ttft_ms']['p50']:.0f} / {f['ttft_ms']['p95']:.0f} | "
              f"{u['ttft_ms']['p50']:.0f} / {u['ttft_ms']['p95']:.0f} | {r['follow_up_ttft_ratio_p50']:.2f} | "
              f"{f['decode_tok_s'].get('p50', float('nan')):.0f} | "
              f"{f['latency_ms']['p50']:.0f} / {f['latency_ms']['p95']:.0f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, help="a bundle dir (else one is exported from --model)")
    p.add_argument("--model", default="tiny", help="preset exported when --bundle is not given")
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                   help="model size overrides for --model, e.g. llm__num_hidden_layers=6")
    p.add_argument("--target", choices=("onnx", "gguf"), default="gguf", help="export target (a --bundle's own wins)")
    p.add_argument("--backend", default=None, help="default: the bundle's own (llamacpp for gguf, ort for onnx)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clients", default="1,2,4")
    p.add_argument("--rounds", type=int, default=3, help="conversations per client")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--no-cache", action="store_true", help="serve without image cache and prefix reuse")
    p.add_argument("--compare-llama-cpp-server", action="store_true",
                   help="also measure llama_cpp.server's decode tok/s on the same GGUF")
    p.add_argument("--out", type=Path, help="write the results as JSON")
    args = p.parse_args(argv)

    from edgevlm.runtime.serve.background import BackgroundServer
    from edgevlm.runtime.serve.cli import build

    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or build_bundle(args.model, parse_overrides(args.override), args.target, Path(tmp))
        app, rt = build(serve_args(args, bundle))
        backend = rt.backend.name
        with BackgroundServer(app) as server:
            conversation(server.url, "bench", 10_000, 4)  # warm-up
            results = [run_level(server.url, "bench", int(c), args.rounds, args.max_tokens, 100 * int(c))
                       for c in args.clients.split(",")]
            peer = (compare_llama_cpp_server(server.url, Path(bundle), args.threads, args.rounds * 3,
                                             4 * args.max_tokens) if args.compare_llama_cpp_server else None)
        rt.close()
    print_table(results)
    if peer:
        print(f"decode tok/s, text-only, client-side, long - short answer: edgevlm serve {peer['edgevlm_serve']:.1f}, "
              f"llama_cpp.server {peer['llama_cpp_server']:.1f} (ratio {peer['ratio']:.3f})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"bundle": str(args.bundle or f"{args.model} {' '.join(args.override)} ({args.target}, exported)"),
                "backend": backend,
                "threads": args.threads, "max_tokens": args.max_tokens, "rounds": args.rounds,
                "cache": not args.no_cache}
        args.out.write_text(json.dumps({"config": meta, "results": results, "llama_cpp_server": peer}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
