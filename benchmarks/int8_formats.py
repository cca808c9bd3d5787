"""Accuracy and speed of each int8 format (``--int8-target``) on this CPU.

Example (the README's table; the second line runs the same binary as an AVX2-only CPU, no VNNI):
    python benchmarks/int8_formats.py --model tiny --out int8_host.json
    qemu-x86_64 -cpu Haswell .venv/bin/python benchmarks/int8_formats.py --model tiny --no-timing \\
        --label "qemu -cpu Haswell (AVX2)" --out int8_avx2.json

For every format in ``export.onnx_quant.INT8_FORMATS`` it quantises the vision graph (static QDQ,
calibrated on ShapesVQA scenes) and the GroupQueryAttention decoder (dynamic) from one fp32 export,
and measures the largest relative L2 error vs PyTorch over every output (logits and KV cache) on
the export validation's cases, the decoder against its integer twin (the kernels' share, which
the export judges; see export/onnx_quant_check.py), and the median run time of each graph on one
thread. Under an
emulator times mean nothing (``--no-timing``), and the CPU class read from /proc/cpuinfo is the
host's, not the emulated CPU's: say what ran with ``--label``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def measure(model, work: Path, calib_count: int = 16, timing: bool = True) -> dict:
    from edgevlm.export import onnx_quant as q
    from edgevlm.export.onnx_quant_check import integer_twin
    from edgevlm.export.onnx_validate import cpu_session, image_cases, validate_graph, validation_cases
    from edgevlm.export.to_onnx import _gqa_source, calibration_pixels, export_fp32_graphs

    graphs = export_fp32_graphs(model, work / "fp32", exporter="torchscript", graphs=("vision_encoder",))
    decoder = _gqa_source(model, graphs, None)["path"]
    pixels, _ = calibration_pixels(model, None, calib_count + 2)
    calib, cases = pixels[:calib_count], {"vision_encoder": image_cases(pixels[calib_count:]),
                                          "decoder": validation_cases(model, "decoder", gqa=True)}
    out = {}
    for name, fmt in q.INT8_FORMATS.items():
        paths = {"vision_encoder": work / f"vision-{name}.onnx", "decoder": work / f"decoder-{name}.onnx"}
        q.quantize_int8_static(graphs["vision_encoder"]["path"], paths["vision_encoder"], calib, fmt)
        q.quantize_int8_dynamic(decoder, paths["decoder"], fmt)
        row = {}
        for graph, path in paths.items():
            report = validate_graph(model, graph, path, "int8", cases[graph], gqa=graph == "decoder", judge=False)
            row[f"{graph}_rel_l2"] = round(report["max_rel_l2_all_outputs"], 4)
        twin = work / f"decoder-{name}-twin.onnx"  # what the export judges: the kernels alone
        integer_twin(paths["decoder"], twin)
        report = validate_graph(model, "decoder", paths["decoder"], "int8", cases["decoder"], gqa=True, judge=False,
                                reference=twin)
        row["decoder_vs_twin_rel_l2"] = round(report["max_rel_l2_all_outputs"], 4)
        for graph, path in paths.items() if timing else ():
            row[f"{graph}_ms"] = round(_median_ms(cpu_session(path, threads=1), cases[graph][0][1]), 3)
        out[name] = row
    return out


def _median_ms(session, inputs: dict, runs: int = 10) -> float:
    from edgevlm.export.onnx_validate import ort_outputs

    ort_outputs(session, inputs)  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        ort_outputs(session, inputs)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="model dir or preset (default: %(default)s)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--no-timing", dest="timing", action="store_false", help="accuracy only (emulated CPUs)")
    p.add_argument("--label", default="", help="what CPU this ran on when /proc/cpuinfo cannot tell (an emulator)")
    p.add_argument("overrides", nargs="*", help="model config overrides, e.g. llm.num_hidden_layers=2")
    args = p.parse_args(argv)

    from edgevlm.export.common import load_for_export
    from edgevlm.runtime.hostcpu import cpu_class, cpu_flags

    model = load_for_export(args.model, args.overrides)
    with tempfile.TemporaryDirectory(prefix="edgevlm-int8-") as tmp:
        rows = measure(model, Path(tmp), timing=args.timing)
    result = {"label": args.label, "cpu_class": cpu_class(), "cpu_flags": cpu_flags(), "model": args.model,
              "overrides": args.overrides, "formats": rows}
    print(f"cpu: {args.label or result['cpu_class']}; max relative L2 vs PyTorch over all outputs" +
          ("; median ms, 1 thread" if args.timing else ""))
    for name, row in rows.items():
        print(f"  {name:<13}" + "  ".join(f"{k} {v}" for k, v in row.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
