"""Time bundles on the target device itself (lean install: no torch, no exporter, no benchmarks/).

    edgevlm bench-target --bundle bundles/tiny-onnx-int4 --bundle bundles/tiny-gguf \\
        --image photo.png --out device.jsonl
    edgevlm bench report host.jsonl device.jsonl --out report/      # on the workstation: one report

Bundles exported on a workstation are copied to the device; this writes the records
``benchmarks/run.py`` writes (an environment block first, then one ``latency`` case per bundle:
vision, prefill, TTFT, decode rate, median [p10-p90] over ``--runs``), with ``measured_on: target``
and the device's environment (CPU model and class from /proc/cpuinfo, cores, RAM, Jetson release,
library versions), so the report shows the device's rows as measured, not projected.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path

from .errors import EdgeVLMError
from .hostcpu import cpu_class, cpu_flags, usable_cpus

LIBRARIES = ("edgevlm", "numpy", "onnxruntime", "llama_cpp_python", "tokenizers", "tensorrt")
METRICS = ("vision_ms", "prefill_ms", "ttft_ms", "prefill_tok_s", "decode_tok_s", "total_ms")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", action="append", required=True, help="a bundle dir (repeatable)")
    p.add_argument("--out", required=True, help="results JSONL (written afresh)")
    p.add_argument("--image", default=None, help="image file (default: a mid-grey image of the bundle's size)")
    p.add_argument("--prompt", default="Describe the image.")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="0: every usable core")
    p.add_argument("--label", default=None, help="model label in the report (default: the bundle's preset)")
    p.add_argument("--note", default=None, help="stored with every record (e.g. 'emulated: timings meaningless')")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key = line.split(":", 1)[0].strip().lower()
            if key in ("model name", "hardware", "cpu part"):
                return line.split(":", 1)[1].strip() if key != "cpu part" else f"Arm part {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_versions(names=LIBRARIES) -> dict[str, str]:
    """Installed versions of those of ``names`` that are installed (benchmarks/environment.py too)."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def environment(note: str | None = None) -> dict:
    """The environment record (``benchmarks/environment.collect``'s keys that need no torch)."""
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 0
    tegra = Path("/etc/nv_tegra_release")
    env = {"type": "environment", "measured_on": "target",
           "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "host": platform.node(), "os": f"{platform.system()} {platform.release()}", "machine": platform.machine(),
           "python": sys.version.split()[0], "cpu": _cpu_model(), "cpu_flags": cpu_flags(), "cpu_class": cpu_class(),
           "cores": {"logical": os.cpu_count() or 1, "usable": usable_cpus()}, "ram_gb": round(pages / 2**30, 1),
           "gpus": [], "jetson": {"release": tegra.read_text().splitlines()[0]} if tegra.is_file() else None,
           "libraries": library_versions(), "git": {},
           "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
    if note:
        env["note"] = note
    keys = ("host", "cpu", "cores", "ram_gb", "gpus", "libraries", "machine", "cpu_class")
    env["env_id"] = hashlib.sha256(json.dumps({k: env[k] for k in keys}, sort_keys=True).encode()).hexdigest()[:12]
    return env


def precision(manifest) -> str:
    info = manifest.target_info
    if manifest.target == "gguf":
        return info.default_quant
    if manifest.target == "onnx":
        if info.quantize == "none":
            return info.dtype
        fmt = info.int8.target if info.int8 is not None else "portable"
        return info.quantize if fmt == "portable" else f"{info.quantize}_{fmt}"
    return manifest.target


def spread(values: list[float]) -> dict:
    import numpy as np

    v = np.asarray(values, dtype=float)
    return {"median": round(float(np.median(v)), 3), "p10": round(float(np.quantile(v, 0.1)), 3),
            "p90": round(float(np.quantile(v, 0.9)), 3), "n": len(values), "values": [round(float(x), 3) for x in v]}


def _image(path: str | None, size: int):
    if path:
        return path
    from PIL import Image

    return Image.new("RGB", (size, size), (128, 128, 128))


def bench_bundle(path: str, args: argparse.Namespace, env: dict) -> dict:
    """One latency case record for the bundle at ``path``."""
    from .engine import Runtime

    rt = Runtime.load(path, threads=args.threads, image_cache_mb=0)
    m = rt.manifest
    image = _image(args.image, m.model.image_size)
    samples: dict[str, list[float]] = {k: [] for k in METRICS}
    start, res = time.time(), None
    for i in range(args.warmup + args.runs):
        res = rt.generate(image, args.prompt, max_new_tokens=args.new_tokens, ignore_eos=True)
        if i < args.warmup:
            continue
        t = res.timings
        for k in ("vision_ms", "prefill_ms", "ttft_ms", "total_ms"):
            samples[k].append(getattr(t, k))
        samples["prefill_tok_s"].append(t.n_prompt_tokens / max(t.prefill_ms, 1e-9) * 1e3)
        if t.decode_tok_s is not None:
            samples["decode_tok_s"].append(t.decode_tok_s)
    rt.backend.close()
    t = res.timings
    label = args.label or m.model.preset or Path(path).name
    backend, prec = rt.backend.name, precision(m)
    workload = {"images": 1, "prompt_tokens": t.n_prompt_tokens, "new_tokens": args.new_tokens, "threads": args.threads}
    rec = {"type": "case", "id": f"{label}/{m.model.integrator}/{backend}/{prec}/target-{env['cpu_class']}/"
                                 f"t{args.threads}-i1-n{args.new_tokens}",
           "task": "latency", "kind": "edgevlm", "backend": backend, "precision": prec,
           "model": {"source": "bundle", "name": m.model.preset, "label": label}, "integrator": m.model.integrator,
           "workload": workload, "warmup": args.warmup, "runs": args.runs, "seed": 0, "env_id": env["env_id"],
           "measured_on": "target", "device": env["cpu_class"],
           "started_utc": _dt.datetime.fromtimestamp(start, _dt.timezone.utc).isoformat(timespec="seconds"),
           "wall_s": round(time.time() - start, 1), "status": "ok",
           "metrics": {k: spread(v) for k, v in samples.items() if v},
           "n_visual_tokens": t.n_visual_tokens, "n_prompt_tokens": t.n_prompt_tokens, "n_generated": t.n_generated,
           "threads_effective": args.threads or usable_cpus(), "accelerator": "cpu", "artifact": str(path),
           "artifact_mb": {f.path: round(f.size / 2**20, 2) for f in m.files if f.size}}
    if args.note:
        rec["note"] = args.note
    return rec


def run(args: argparse.Namespace) -> int:
    if args.runs < 1 or args.warmup < 0 or args.new_tokens < 2:
        raise EdgeVLMError("--runs must be >= 1, --warmup >= 0 and --new-tokens >= 2 (a decode rate needs two tokens)")
    env = environment(args.note)
    records = [env] + [bench_bundle(b, args, env) for b in args.bundle]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    for r in records[1:]:
        print(f"{r['id']}: TTFT {r['metrics']['ttft_ms']['median']:.1f} ms, decode "
              f"{r['metrics'].get('decode_tok_s', {}).get('median', float('nan')):.1f} tok/s")
    print(f"wrote {args.out} ({env['cpu_class']}, {env['cpu']})")
    return 0
