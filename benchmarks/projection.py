"""Project latency and memory onto target devices we do not have (a roofline with efficiencies).

Inputs: analytic FLOPs and bytes per stage (``flops.py``), device profiles (``devices/*.yaml``)
and per-stage efficiency factors.

The model is a roofline per stage: ``time = max(FLOPs / compute, bytes / bandwidth) / efficiency``
(+ a fixed per-token overhead for decode), where compute and bandwidth are the engine's sustained
figures (``peak x sustained fraction``; measured directly on the host), compute at the stage's own
precision where the profile has a rate for it (``OWN_RATE``: bf16), and ``efficiency`` is the
fraction of that roofline a software stack reaches in that stage. Efficiency factors by engine class:

* ``cpu``: calibrated on this host from a results file (per backend, leave-one-out when validating);
  defaults from the project's reference host measurement when no results are given.
* ``gpu``: from llama.cpp's own published RTX 4090 numbers (see ``DEFAULT_EFFICIENCY``), never from
  the Jetson numbers we validate against.

``python benchmarks/projection.py --validate [results.jsonl]`` prints projected vs published
(MobileVLM-1.7B 4-bit: Jetson Orin, Snapdragon 888, i7-10750H) and, given results, vs measured.
Everything projected is labelled ``projected``; nothing here is a measurement.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import yaml

from edgevlm.benchmarks.flops import stage_costs
from edgevlm.runtime.errors import EdgeVLMError

DEVICES_DIR = Path(__file__).resolve().parent / "devices"
STAGES = ("vision", "integrator", "prefill", "decode")
RUNTIME_OVERHEAD_MB = 250  # process, libraries, allocator slack (llama.cpp CPU runs use ~150-300 MB)

DEFAULT_EFFICIENCY: dict[str, dict[str, Any]] = {
    "gpu": {"vision": 0.45, "integrator": 0.45, "prefill": 0.45, "decode": 0.82, "decode_overhead_ms": 0.0,
            "source": "llama.cpp PR 4766 (2024-01-10), RTX 4090, LLaMA-7B F16: pp512 11048 tok/s = ~149 "
                      "TFLOP/s of 330 dense fp16 (0.45); tg128 61.0 tok/s x 13.5 GB = 822 GB/s of 1008 (0.82)"},
    "cpu": {"vision": 0.5, "integrator": 0.3, "prefill": 1.0, "decode": 0.7, "decode_overhead_ms": 0.0,
            "source": "edgevlm reference host (shared/reference/llamacpp.md): raw llama.cpp MobileLLaMA-1.4B "
                      "Q4_K_M decode 21.8 tok/s x 0.83 GB at 25 GB/s (0.72); prefill ~150 GFLOP/s, about the "
                      "host's fp32 GEMM rate (1.0, int8 kernels); vision/integrator: rough, uncalibrated"},
}


# --- device profiles ----------------------------------------------------------------------------


def load_devices(directory: Path = DEVICES_DIR) -> dict[str, dict]:
    devices = {}
    for path in sorted(Path(directory).glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict) or "engines" not in data:
            raise EdgeVLMError(f"{path}: a device profile needs 'engines'")
        devices[data.get("name", path.stem)] = data
    return devices


def host_device(profile: dict, env: dict) -> dict:
    """The ``host`` profile filled from a results file's environment block (measured numbers)."""
    bw = (env.get("bandwidth") or {}).get("read_gbs")
    gemm = env.get("gemm_fp32_gflops")
    if not bw or not gemm:
        raise EdgeVLMError("the results' environment has no measured bandwidth/GEMM (run without --no-limits)")
    dev = json.loads(json.dumps(profile))
    dev.update(title=f"{env.get('cpu', 'host')} (measured)", memory_gb=env.get("ram_gb"),
               usable_memory_gb=round(0.85 * env.get("ram_gb", 0), 1), memory_bandwidth_gbs=bw)
    cpu = dev["engines"]["cpu"]
    cpu.update(compute_tflops=gemm / 1000, threads=env.get("cores", {}).get("usable"))
    cpu["tflops"] = {"fp32": gemm / 1000, **({"bf16": env["gemm_bf16_gflops"] / 1000} if env.get("gemm_bf16_gflops") else {})}
    return dev


def engine_of(device: dict, engine: str | None = None) -> tuple[str, dict]:
    name = engine or device.get("default_engine") or next(iter(device["engines"]))
    if name not in device["engines"]:
        raise EdgeVLMError(f"device {device['name']} has no engine {name!r} ({', '.join(device['engines'])})")
    return name, device["engines"][name]


# --- the roofline -------------------------------------------------------------------------------


# Precisions computed at their own rate where the engine's profile gives one (``tflops``); the rest
# use the engine's basis (``compute_tflops``). Only bf16 so far: the host measures it (oneDNN with
# AMX runs bf16 ~4x its fp32 GEMM), while how a library computes fp16 or int8 on a CPU (native,
# converted, VNNI or not) differs too much to project from a peak.
OWN_RATE = {"bf16": "bf16"}


def _limits(device: dict, eng: dict, precision: str | None = None) -> tuple[float, float]:
    """(sustained FLOP/s, sustained bytes/s) of an engine computing in ``precision``."""
    s = eng.get("sustained") or {}
    rate = (eng.get("tflops") or {}).get(OWN_RATE.get((precision or "").lower(), ""), eng["compute_tflops"])
    compute = rate * 1e12 * s.get("compute", 1.0)
    bandwidth = eng.get("bandwidth_gbs", device["memory_bandwidth_gbs"]) * 1e9 * s.get("bandwidth", 1.0)
    return compute, bandwidth


def roofline_s(flops: float, nbytes: float, compute: float, bandwidth: float) -> tuple[float, str]:
    tc, tb = flops / compute, nbytes / bandwidth
    return (tc, "compute") if tc >= tb else (tb, "bandwidth")


def project(costs: dict, device: dict, engine: str | None = None, efficiency: dict | None = None) -> dict:
    """Projected stage latencies, decode rate and memory verdict of one request on one device."""
    name, eng = engine_of(device, engine)
    eff = {**DEFAULT_EFFICIENCY.get(eng["class"], DEFAULT_EFFICIENCY["cpu"]), **(efficiency or {})}
    out: dict[str, Any] = {"device": device["name"], "engine": name, "bound": {}}
    for stage in ("vision", "integrator", "prefill"):
        t, bound = roofline_s(costs[stage]["flops"], costs[stage]["bytes"], *_limits(device, eng, _precision(costs, stage)))
        out[f"{stage}_ms"] = t / eff[stage] * 1e3
        out["bound"][stage] = bound
    d = costs["decode"]
    compute, bandwidth = _limits(device, eng, _precision(costs, "decode"))
    t, out["bound"]["decode"] = roofline_s(d["flops_per_token"], d["bytes_per_token"], compute, bandwidth)
    per_token = t / eff["decode"] + eff.get("decode_overhead_ms", 0.0) / 1e3
    out.update(tower_ms=out["vision_ms"], vision_ms=out["vision_ms"] + out["integrator_ms"],
               decode_tok_s=1.0 / per_token, decode_bound_tok_s=bandwidth / d["bytes_per_token"])
    out["ttft_ms"] = out["vision_ms"] + out["prefill_ms"]
    out["prefill_tok_s"] = costs["prefill"]["tokens"] / out["prefill_ms"] * 1e3
    out["memory"] = memory_verdict(costs, device)
    return out


def _precision(costs: dict, stage: str) -> str | None:
    """The precision a stage computes in: the vision precision for the tower and integrator."""
    p = costs.get("precision") or {}
    return p.get("vision") if stage in ("vision", "integrator") else p.get("llm")


def memory_verdict(costs: dict, device: dict) -> dict:
    """Weights + KV cache (this request, and the full context) + workspace + runtime vs the device."""
    needed = costs["weights_bytes"] / 2**20 + costs["kv_cache_bytes"] / 2**20 + RUNTIME_OVERHEAD_MB
    full_ctx = needed - costs["kv_cache_bytes"] / 2**20 + costs["kv_cache_bytes_full_context"] / 2**20
    usable = float(device.get("usable_memory_gb") or device.get("memory_gb") or 0) * 1024
    total = float(device.get("memory_gb") or 0) * 1024
    verdict = "fits" if needed <= usable else ("tight" if needed <= total else "does not fit")
    return {"needed_mb": round(needed), "needed_full_context_mb": round(full_ctx), "usable_mb": round(usable),
            "verdict": verdict, "full_context_fits": full_ctx <= usable}


# --- calibration on measured hosts ---------------------------------------------------------------

MEASURED_STAGE = {"vision": "vision_ms", "prefill": "prefill_ms", "decode": "decode_tok_s"}


def stage_efficiencies(record: dict, device: dict) -> dict[str, float]:
    """Efficiency each stage of one measured record reached on ``device`` (its host)."""
    _, eng = engine_of(device)
    c, m = record["costs"], record["metrics"]

    def ideal_s(stage: str) -> float:
        limits = _limits(device, eng, _precision(c, stage))
        if stage == "decode":
            return roofline_s(c["decode"]["flops_per_token"], c["decode"]["bytes_per_token"], *limits)[0]
        return roofline_s(c[stage]["flops"], c[stage]["bytes"], *limits)[0]

    out = {}
    for stage, metric in MEASURED_STAGE.items():
        if metric not in m:
            continue
        if stage == "decode":
            out[stage] = ideal_s("decode") * m[metric]["median"]
        else:
            ideal = ideal_s("vision") + ideal_s("integrator") if stage == "vision" else ideal_s(stage)
            out[stage] = ideal / (m[metric]["median"] / 1e3)
    return out


def calibratable(record: dict) -> bool:
    """Measured records whose decode really streams weights from DRAM (not a cache-resident toy)."""
    return (record.get("type") == "case" and record.get("status") == "ok" and "costs" in record
            and not (record.get("limits") or {}).get("cache_resident", False))


def calibrate(records: list[dict], device: dict, exclude_id: str | None = None) -> dict[str, dict]:
    """Per backend: median efficiency per stage over calibratable records (``integrator`` follows
    ``vision``, which the measured vision time includes). ``exclude_id`` leaves one record out."""
    per_backend: dict[str, dict[str, list[float]]] = {}
    for rec in records:
        if not calibratable(rec) or rec["id"] == exclude_id:
            continue
        effs = stage_efficiencies(rec, device)
        for stage, e in effs.items():
            per_backend.setdefault(stack_of(rec["backend"]), {}).setdefault(stage, []).append(e)
    out = {}
    for backend, stages in per_backend.items():
        factors = {s: statistics.median(v) for s, v in stages.items()}
        if "vision" in factors:
            factors["integrator"] = factors["vision"]
        factors["n_records"] = max(len(v) for v in stages.values())
        factors["source"] = f"calibrated on {factors['n_records']} host record(s) of {backend}"
        out[backend] = factors
    return out


def stack_of(backend: str) -> str:
    """Peers share the calibration of the stack they run (raw llama.cpp is llama.cpp)."""
    return {"llamacpp_raw": "llamacpp", "hf_eager": "torch"}.get(backend, backend)


def host_validation(records: list[dict], device: dict) -> list[dict]:
    """Projected vs measured on the host, each record projected with factors calibrated on the
    *other* records of its stack (leave-one-out; no factor for a stack with a single record)."""
    rows = []
    for rec in records:
        if not calibratable(rec):
            continue
        factors = calibrate(records, device, exclude_id=rec["id"]).get(stack_of(rec["backend"]))
        if not factors:
            continue
        p = project(rec["costs"], device, efficiency=factors)
        row = {"id": rec["id"], "backend": rec["backend"], "n_calibration": factors["n_records"]}
        for metric in ("vision_ms", "prefill_ms", "ttft_ms", "decode_tok_s"):
            measured = (rec["metrics"].get(metric) or {}).get("median")
            if measured:
                row[metric] = {"projected": p[metric], "measured": measured, "ratio": p[metric] / measured}
        rows.append(row)
    return rows


def published_validation(devices: dict[str, dict], cpu_factors: dict | None = None) -> list[dict]:
    """Projected vs each published number in the device profiles (``published:`` entries); an
    entry whose board is uncertain (``also_on``) is projected on each candidate too."""
    from edgevlm.benchmarks.flops import preset_shape

    rows, shapes = [], {}
    for dev in devices.values():
        for pub in dev.get("published") or []:
            shapes.setdefault(pub["preset"], preset_shape(pub["preset"]))
            costs = stage_costs(shapes[pub["preset"]], pub["precision"], n_text=pub.get("n_text", 48),
                                n_new=pub.get("n_new", 32))
            for target in [dev] + [devices[n] for n in pub.get("also_on", []) if n in devices]:
                rows.append(_published_row(pub, costs, target, cpu_factors, primary=target is dev))
    return rows


def _published_row(pub: dict, costs: dict, dev: dict, cpu_factors: dict | None, primary: bool) -> dict:
    _, eng = engine_of(dev, pub.get("engine"))
    factors = cpu_factors if (eng["class"] == "cpu" and cpu_factors) else None
    p = project(costs, dev, pub.get("engine"), factors)
    row = {"device": dev["name"], "label": pub["label"] + ("" if primary else f" (if run on {dev['name']})"),
           "source": pub["source"], "primary": primary,
           "efficiency_source": (factors or DEFAULT_EFFICIENCY[eng["class"]])["source"]}
    for metric in ("vision_ms", "prefill_tok_s", "decode_tok_s"):
        if metric in pub:
            row[metric] = {"projected": p[metric], "published": pub[metric], "ratio": p[metric] / pub[metric]}
    return row


REFERENCE = ("mobilevlm-1.7b", "q4_k_m")  # always projected: the configuration MobileVLM published


def device_projections(records: list[dict], devices: dict, calib: dict) -> list[dict]:
    """Projected TTFT / decode / memory verdict per configuration and target device: the measured
    llama.cpp configurations (else every edgevlm one), plus MobileVLM-1.7B 4-bit when absent."""
    from edgevlm.benchmarks.flops import preset_shape

    pool = [r for r in records if r.get("kind") == "edgevlm" and r.get("status") == "ok" and "costs" in r]
    preferred = [r for r in pool if r["backend"] == "llamacpp"] or pool
    configs: dict[str, tuple[dict, str]] = {}
    for r in preferred:
        name = f"{r['model']['label']}/{r['integrator'] or 'own'} {r['precision']}"
        configs.setdefault(name, (r["costs"], r["backend"]))
    if not any(n.startswith(REFERENCE[0]) and n.endswith(REFERENCE[1]) for n in configs):
        costs = stage_costs(preset_shape(REFERENCE[0]), REFERENCE[1], n_text=48, n_new=32)
        configs[f"{REFERENCE[0]}/ldp {REFERENCE[1]} (reference, not in these results)"] = (costs, "llamacpp")
    rows = []
    for name, (costs, backend) in configs.items():
        for dev in (d for d in devices.values() if not d.get("measured")):
            _, eng = engine_of(dev)
            p = project(costs, dev, efficiency=calib.get(stack_of(backend)) if eng["class"] == "cpu" else None)
            rows.append({"config": name, "device": dev["name"], "engine": p["engine"], "ttft_ms": p["ttft_ms"],
                         "decode_tok_s": p["decode_tok_s"], "verdict": p["memory"]["verdict"],
                         "needed_mb": p["memory"]["needed_mb"]})
    return rows


VIDEO_PROMPT_TOKENS, VIDEO_ANSWER_TOKENS = 16, 8  # a standing question and a short answer per frame


def video_projection(devices: dict, calib: dict | None = None, preset: str = REFERENCE[0],
                     precision: str = REFERENCE[1]) -> list[dict]:
    """Projected ``edgevlm watch`` rate per target device: each answer runs one frame through the vision
    tower, prefills the prompt and decodes ``VIDEO_ANSWER_TOKENS`` (no frame skipped as unchanged, no cache
    hit: the slowest steady state). Labelled projected; nothing here is measured."""
    from edgevlm.benchmarks.flops import preset_shape

    costs = stage_costs(preset_shape(preset), precision, n_text=VIDEO_PROMPT_TOKENS, n_new=VIDEO_ANSWER_TOKENS)
    rows = []
    for dev in (d for d in devices.values() if not d.get("measured")):
        _, eng = engine_of(dev)
        p = project(costs, dev, efficiency=(calib or {}).get("llamacpp") if eng["class"] == "cpu" else None)
        answer_ms = p["ttft_ms"] + (VIDEO_ANSWER_TOKENS - 1) / p["decode_tok_s"] * 1e3
        rows.append({"config": f"video: {preset} {precision}, 1 frame + {VIDEO_ANSWER_TOKENS} tokens per answer",
                     "device": dev["name"], "engine": p["engine"], "answer_ms": answer_ms,
                     "answers_per_s": 1e3 / answer_ms, "label": "projected"})
    return rows


def _format_rows(rows: list[dict], ref: str) -> str:
    lines = []
    for r in rows:
        cells = [f"{m} {v['projected']:.4g} vs {v[ref]:.4g} (x{v['ratio']:.2f})" for m, v in r.items()
                 if isinstance(v, dict) and "ratio" in v]
        lines.append(f"{r.get('label') or r['id']}: " + "; ".join(cells))
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="?", help="results JSONL (calibrates the cpu class on its host)")
    p.add_argument("--validate", action="store_true", help="projected vs published and vs measured")
    p.add_argument("--preset", default="mobilevlm-1.7b")
    p.add_argument("--precision", default="q4_k_m")


def run(args: argparse.Namespace) -> int:
    devices = load_devices()
    cpu = None
    if args.results:
        from edgevlm.benchmarks.run import read_records

        records = read_records(Path(args.results))
        env = next((r for r in reversed(records) if r.get("type") == "environment"), {})
        host = host_device(devices["host"], env)
        cpu = calibrate(records, host).get("llamacpp")
        print(_format_rows(host_validation(records, host), "measured") or "(no calibratable host records)")
    if args.validate:
        print(_format_rows(published_validation(devices, cpu), "published"))
        return 0
    from edgevlm.benchmarks.flops import preset_shape

    costs = stage_costs(preset_shape(args.preset), args.precision)
    for name, dev in devices.items():
        if dev.get("measured"):
            continue
        r = project(costs, dev)
        print(f"{name:<28} {r['engine']:<4} ttft {r['ttft_ms']:8.0f} ms  decode {r['decode_tok_s']:7.1f} tok/s  "
              f"memory {r['memory']['needed_mb']} MB -> {r['memory']['verdict']}")
    for v in video_projection(devices, None, args.preset, args.precision):
        print(f"{v['device']:<28} {v['engine']:<4} video (edgevlm watch) {v['answers_per_s']:6.2f} answers/s, "
              f"{v['answer_ms']:.0f} ms per answer (projected)")
    return 0


if __name__ == "__main__":
    from edgevlm.cli import script_main

    script_main("bench", "project")
