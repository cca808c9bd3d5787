"""Report sections for target devices not at hand: roofline projections, calibration and validation."""
from __future__ import annotations

from edgevlm.benchmarks.report_render import Block, fmt


def projection_blocks(envs: list[dict], ok: list[dict]) -> list[Block]:
    from edgevlm.benchmarks import plots, projection as pj

    devices = pj.load_devices()
    env = next((e for e in reversed(envs) if (e.get("bandwidth") or {}).get("read_gbs")), None)
    calib: dict = {}
    blocks: list[Block] = [
        ("h2", "Projected: other devices (roofline model, not measured)"),
        ("p", "Each stage: max(FLOPs / sustained compute, bytes / sustained bandwidth) / efficiency, from analytic "
              "FLOPs and bytes (benchmarks/flops.py) and device profiles with sources (benchmarks/devices/). "
              "CPU-class efficiency is calibrated on this host's records per stack; GPU-class efficiency comes from "
              "llama.cpp's published RTX 4090 numbers.")]
    if env is not None:
        host = pj.host_device(devices["host"], env)
        calib = pj.calibrate(ok, host)
        blocks += _calibration_blocks(calib, pj.host_validation(ok, host))
    blocks += _published_blocks(pj.published_validation(devices), "CPU efficiency: documented defaults")
    if calib.get("llamacpp"):
        rows = pj.published_validation(devices, calib["llamacpp"])
        rows = [r for r in rows if "calibrated" in r["efficiency_source"]]
        blocks += _published_blocks(rows, "CPU efficiency: calibrated on this run's llama.cpp host records")
    rows, table = _device_rows(ok, devices, calib)
    if rows:
        blocks += [("h3", "Projected latency and memory per target device"),
                   ("p", "Cell: TTFT ms / decode tok/s / memory verdict (weights + KV cache of this request + "
                         "runtime vs the memory one process can use)."), table,
                   ("img", "projected_devices", plots.projected_devices(rows),
                    "Projected TTFT and decode rate per device")]
    return blocks


def _calibration_blocks(calib: dict, host_rows: list[dict]) -> list[Block]:
    if not calib:
        return [("p", "No calibratable host record (all were cache-resident toys or failed): CPU-class factors "
                      "are the documented defaults.")]
    table = [[stack, fmt(f.get("vision")), fmt(f.get("prefill")), fmt(f.get("decode")), f["n_records"]]
             for stack, f in sorted(calib.items())]
    blocks: list[Block] = [("h3", "Efficiency factors calibrated on this host (fraction of the roofline reached)"),
                           ("table", ["stack", "vision", "prefill", "decode", "records"], table)]
    if host_rows:
        metrics = ("vision_ms", "prefill_ms", "ttft_ms", "decode_tok_s")
        rows = [[r["id"], r["n_calibration"]] + [_ratio(r.get(m)) for m in metrics] for r in host_rows]
        blocks += [("h3", "Validation on the host: projected / measured (leave-one-out)"),
                   ("p", "Each record is projected with factors calibrated on the other records of its stack."),
                   ("table", ["case", "calibration records", "vision", "prefill", "TTFT", "decode tok/s"], rows)]
    return blocks


def _ratio(v: dict | None) -> str:
    if not v:
        return "-"
    return f"x{v['ratio']:.2f} ({fmt(v['projected'])} vs {fmt(v.get('measured', v.get('published')))})"


def _published_blocks(rows: list[dict], basis: str) -> list[Block]:
    if not rows:
        return []
    table = [[r["label"], r["device"]] + [_ratio(r.get(m)) for m in ("vision_ms", "prefill_tok_s", "decode_tok_s")]
             + [r["efficiency_source"][:90], r["source"][:120]] for r in rows]
    return [("h3", f"Validation against published numbers: projected / published ({basis})"),
            ("p", "MobileVLM-1.7B, 4-bit LLM + f16 vision, llama.cpp. x1.00 = exact; > 1 = the projection is "
                  "optimistic (for vision ms, < 1 is optimistic)."),
            ("table", ["published measurement", "projected on", "vision ms", "prefill tok/s", "decode tok/s",
                       "efficiency from", "source"], table)]


def _device_rows(ok: list[dict], devices: dict, calib: dict) -> tuple[list[dict], Block]:
    from edgevlm.benchmarks import projection as pj

    rows = pj.device_projections(ok, devices, calib)
    targets = list(dict.fromkeys(r["device"] for r in rows))
    table = []
    for config in dict.fromkeys(r["config"] for r in rows):
        cells = {r["device"]: r for r in rows if r["config"] == config}
        table.append([config] + [f"{fmt(c['ttft_ms'])} / {fmt(c['decode_tok_s'])} / {c['verdict']}"
                                 for c in (cells[d] for d in targets)])
    if rows:  # the video row (edgevlm watch): answers per second, projected (docs/video.md)
        video = {v["device"]: v for v in pj.video_projection(devices, calib)}
        table.append([next(iter(video.values()))["config"] + " (answers/s, projected)"]
                     + [f"{fmt(video[d]['answers_per_s'])} answers/s" if d in video else "-" for d in targets])
    return rows, ("table", ["configuration"] + targets, table)
