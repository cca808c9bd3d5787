"""Build TensorRT engines from an ONNX bundle (NVIDIA GPUs, Jetson Orin): a TensorRT bundle.

Example (on the device that will run it -- engines are tied to its TensorRT version and GPU):
    python export/to_trt.py --bundle bundles/tiny-onnx --out bundles/tiny-trt --precision fp16

One engine per graph of the ONNX bundle: vision encoder + integrator (batch profile; optionally on a
DLA core with GPU fallback), token embeddings, and the decoder with its KV cache (a prefill and a
decode profile). --precision int8 calibrates the vision engine on dataset images (--calib-data,
default: generated ShapesVQA scenes) unless its graph is already Q/DQ-quantised; the decoder stays
fp16. --timing-cache FILE reuses tactic timings across engines and runs. Every graph is first
checked against TensorRT's ONNX operator list (export/data/tensorrt_onnx_ops.yaml).

--dry-run prints the build plan and the equivalent trtexec command lines and needs no TensorRT.
Without TensorRT or a CUDA device the command exits with status 2, saying what is missing, and
prints the trtexec command lines. Run the bundle with Runtime.load(DIR, backend="trt").
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from edgevlm.runtime.errors import EdgeVLMError

PRECISIONS = ("fp32", "fp16", "int8", "fp8")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="ONNX bundle (from export/to_onnx.py, --dtype fp32 or fp16)")
    p.add_argument("--out", required=True, help="TensorRT bundle directory to write (replaced if it exists)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp16", help="default: %(default)s")
    p.add_argument("--max-batch", type=int, default=1, help="largest image batch of the vision engine (default: 1)")
    p.add_argument("--max-seq", type=int, default=None,
                   help="context length the engines support: prompt + visual tokens + answer "
                        "(default: the model's max positions)")
    p.add_argument("--workspace-gb", type=float, default=2.0,
                   help="TensorRT builder workspace limit in GiB (default: %(default)s)")
    p.add_argument("--timing-cache", help="timing cache file: read if present, updated after every engine")
    p.add_argument("--dla-core", type=int, default=None,
                   help="run the vision engine on this DLA core with GPU fallback (AGX Orin / Orin NX)")
    p.add_argument("--calib-data", help="int8 calibration images: a folder or a LLaVA .json "
                                        "(default: freshly generated ShapesVQA scenes)")
    p.add_argument("--calib-count", type=int, default=32, help="int8 calibration images (default: %(default)s)")
    p.add_argument("--calib-cache", help="reuse this int8 calibration cache instead of calibrating")
    p.add_argument("--device", type=int, default=0, help="CUDA device index (default: 0)")
    p.add_argument("--verbose", action="store_true", help="TensorRT's log at INFO level")
    p.add_argument("--dry-run", action="store_true", help="print the plan and trtexec commands; build nothing")


def prepare(args: argparse.Namespace):
    """(manifest, plan, op report) for the arguments; raises EdgeVLMError on anything wrong."""
    from edgevlm.runtime.manifest import read_manifest

    from . import trt_ops, trt_plan

    bundle = Path(args.bundle)
    manifest = read_manifest(bundle)
    if manifest.target != "onnx":
        raise EdgeVLMError(f"{bundle}: a {manifest.target!r} bundle; TensorRT engines are built from an ONNX "
                           "bundle (python export/to_onnx.py)")
    reason = manifest.target_info.trt_refusal
    if reason:
        raise EdgeVLMError(f"integrator {manifest.model.integrator!r} cannot be built into TensorRT engines: {reason}")
    if Path(args.out).resolve() == bundle.resolve():
        raise EdgeVLMError("--out must differ from --bundle (the ONNX bundle is the build's input)")
    if args.calib_count < 1:
        raise EdgeVLMError(f"--calib-count must be >= 1, got {args.calib_count}")
    if args.calib_cache and not Path(args.calib_cache).is_file():
        raise EdgeVLMError(f"--calib-cache {args.calib_cache}: no such file")
    report = trt_ops.check_bundle(bundle, manifest)
    trt_ops.require_supported(report)
    quant = {g: trt_ops.quantization_kind(bundle / manifest.file(g).path) for g in trt_plan.GRAPHS}
    plan = trt_plan.make_plan(bundle, manifest, args.out, args.precision, args.max_batch, args.max_seq,
                              args.workspace_gb, args.timing_cache, args.dla_core, quant)
    return manifest, plan


def print_plan(manifest, plan) -> None:
    from . import trt_ops, trt_plan

    print(trt_plan.format_plan(plan, manifest, trt_plan.memory_estimate(manifest, plan)))
    print(f"  op check   ok: every operator is supported by {trt_ops.load_support().describe()}")


def print_trtexec(plan, file=sys.stdout) -> None:
    from . import trt_plan

    print(f"\n# equivalent trtexec commands (TensorRT {plan.tensorrt_target}; on Jetson: "
          "/usr/src/tensorrt/bin/trtexec)", file=file)
    if any(e.int8 == "calibrate" for e in plan.engines):
        print(f"# --calib reads the int8 calibration cache that a Python build writes ({trt_plan.CALIB_CACHE}); "
              "without it trtexec uses placeholder ranges: fine for timing, not for accuracy", file=file)
    for line in trt_plan.trtexec_lines(plan):
        print(line, file=file)


def _pixels_loader(manifest, calib_data: str | None, count: int):
    """Lazily preprocessed calibration images, the same way as the ONNX exporter's int8 path."""
    from types import SimpleNamespace

    from .to_onnx import calibration_pixels

    def load() -> list:
        shim = SimpleNamespace(cfg=SimpleNamespace(preprocess=manifest.preprocess))  # all it reads
        return calibration_pixels(shim, calib_data, count)[0]

    return load


def export_trt(args: argparse.Namespace, manifest, plan, tc) -> Path:
    """Build the engines of ``plan`` into a staged bundle and commit it with its manifest."""
    from edgevlm.runtime.manifest import BundleWriter, ExporterInfo, FileEntry, Manifest
    from edgevlm.runtime.target_info import TrtDevice, TrtInfo

    from . import trt_build, trt_ops
    from .common import library_versions
    from .trt_plan import CALIB_CACHE

    bundle, t0 = Path(plan.bundle), time.perf_counter()
    with BundleWriter(plan.out) as w:
        if args.calib_cache:
            shutil.copy2(args.calib_cache, w.path(CALIB_CACHE))
        facts = trt_build.build_all(tc, plan, w.dir, _pixels_loader(manifest, args.calib_data, args.calib_count),
                                    verbose=args.verbose)
        files = [FileEntry(e.engine, e.graph) for e in plan.engines]
        if (w.dir / CALIB_CACHE).is_file():
            files.append(FileEntry(CALIB_CACHE, "calibration_cache"))
        for f in manifest.files:
            if f.role.startswith("tokenizer"):
                shutil.copy2(bundle / f.path, w.path(f.path))
                files.append(FileEntry(f.path, f.role))
        info = TrtInfo(tensorrt=tc.version, device=TrtDevice(tc.device.name, tc.device.sm), precision=plan.precision,
                       source_bundle=str(bundle.resolve()), source_dtype=manifest.target_info.dtype,
                       plan=plan.to_dict(), engines=facts["engines"], op_list=trt_ops.load_support().describe(),
                       build_s=round(time.perf_counter() - t0, 1))
        versions = library_versions("tensorrt", "cuda-python", "onnx")
        out = Manifest(target="trt", model=manifest.model, preprocess=manifest.preprocess,
                       chat_template=manifest.chat_template, tokens=manifest.tokens, target_info=info, files=files,
                       exporter=ExporterInfo("edgevlm.export.to_trt", versions))
        return w.commit(out)


def run(args: argparse.Namespace) -> int:
    from . import trt_build

    manifest, plan = prepare(args)
    if args.dry_run:
        print_plan(manifest, plan)
        print_trtexec(plan)
        return 0
    try:
        tc = trt_build.probe(args.device)
    except trt_build.TensorRTUnavailable as e:
        print(f"edgevlm export: error: cannot build TensorRT engines here: {e}. Build them on the device "
              "that will run them (Jetson: JetPack 6.1+ ships TensorRT 10.3 and its Python module) with this "
              "same command, or with the trtexec commands below.", file=sys.stderr)
        print_trtexec(plan)
        return 2
    try:
        if plan.precision == "fp8" and tuple(map(int, tc.device.sm.split("."))) < (8, 9):
            raise EdgeVLMError(f"--precision fp8 needs an SM 8.9+ GPU; {tc.device.name} is SM {tc.device.sm}")
        print(f"TensorRT {tc.version} on {tc.device.name} (SM {tc.device.sm})")
        out = export_trt(args, manifest, plan, tc)
    finally:
        tc.cuda.close()
    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out} ({total / 2**20:.1f} MiB); run it with Runtime.load({str(out)!r}, backend=\"trt\")")
    return 0


if __name__ == "__main__":
    from edgevlm.cli import script_main

    script_main("export", "trt")
