"""Build TensorRT engines from a ``trt_plan.BuildPlan`` with the TensorRT Python API: ONNX parser,
optimisation profiles, precision flags, int8 entropy calibration on dataset images, a timing cache
shared by the engines (and reused across runs with ``--timing-cache``), DLA with GPU fallback.

TensorRT and cuda-python are imported by ``probe()`` only, so this module imports anywhere.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edgevlm.runtime.errors import EdgeVLMError
from edgevlm.runtime.graph_io import PIXEL_VALUES

from .trt_plan import CALIB_CACHE, BuildPlan, EnginePlan


class TensorRTUnavailable(EdgeVLMError):
    """No TensorRT Python package, no cuda-python, or no CUDA device here."""


@dataclass
class Toolchain:
    trt: object  # the tensorrt module
    cuda: object  # edgevlm.runtime.cuda_device.Cuda
    device: object  # DeviceInfo

    @property
    def version(self) -> str:
        return self.trt.__version__


def probe(device: int = 0) -> Toolchain:
    """TensorRT + a CUDA device, or TensorRTUnavailable saying which is missing."""
    from edgevlm.runtime.cuda_device import Cuda, import_cudart, import_tensorrt

    try:
        trt = import_tensorrt()
        cuda = Cuda(import_cudart(), device)
    except EdgeVLMError as e:
        raise TensorRTUnavailable(str(e)) from None
    except Exception as e:  # a CUDA driver that will not initialise, for example
        raise TensorRTUnavailable(f"CUDA is not usable here ({type(e).__name__}: {e})") from None
    return Toolchain(trt, cuda, cuda.info())


def write_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def make_calibrator(tc: Toolchain, batches: Sequence[np.ndarray], cache: Path, input_name: str = PIXEL_VALUES):
    """An IInt8EntropyCalibrator2 over preprocessed image batches ([B, 3, S, S] float32 each); it
    reads ``cache`` if present (no images needed then) and writes it after calibrating."""
    trt = tc.trt
    nbytes = max(b.nbytes for b in batches) if batches else 4

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches = list(batches)
            self.index = 0
            self.buffer = tc.cuda.malloc(nbytes)

        def get_batch_size(self):
            return int(self.batches[0].shape[0]) if self.batches else 1

        def get_batch(self, names):
            if self.index >= len(self.batches):
                return None
            tc.cuda.h2d(self.buffer, self.batches[self.index].astype(np.float32))
            tc.cuda.sync()
            self.index += 1
            return [self.buffer] if input_name in names else None

        def read_calibration_cache(self):
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data):
            write_atomic(cache, bytes(data))

    return Calibrator()


def calibration_batches(pixels: Sequence[np.ndarray], batch: int) -> list[np.ndarray]:
    """Group [1, 3, S, S] images into [batch, 3, S, S] arrays (a DLA engine has a fixed batch)."""
    flat = [p[i] for p in pixels for i in range(p.shape[0])]
    return [np.stack(flat[i:i + batch]) for i in range(0, len(flat) - batch + 1, batch)]


def _parse(tc: Toolchain, logger, onnx_path: Path):
    trt = tc.trt
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # external data is read relative to the file
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EdgeVLMError(f"TensorRT's ONNX parser rejected {onnx_path}: {'; '.join(errors[:5])}")
    return builder, network, parser


def _config(tc: Toolchain, builder, plan: BuildPlan, ep: EnginePlan, timing_cache: bytes):
    trt = tc.trt
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(plan.workspace_gb * 2**30))
    for f in ep.flags:
        config.set_flag(getattr(trt.BuilderFlag, f))
    for f in ep.clear_flags:
        config.clear_flag(getattr(trt.BuilderFlag, f))
    profiles = []
    for p in ep.profiles:
        prof = builder.create_optimization_profile()
        for name, r in p.shapes.items():
            prof.set_shape(name, r.min, r.opt, r.max)
        config.add_optimization_profile(prof)
        profiles.append(prof)
    cache = config.create_timing_cache(timing_cache)
    config.set_timing_cache(cache, False)
    if ep.dla_core is not None:
        if ep.dla_core >= builder.num_DLA_cores:
            raise EdgeVLMError(f"--dla-core {ep.dla_core}: this device has {builder.num_DLA_cores} DLA core(s) "
                               "(Orin Nano has none; AGX Orin and Orin NX have DLA)")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = ep.dla_core
    return config, profiles


def build_engine(tc: Toolchain, logger, plan: BuildPlan, ep: EnginePlan, dst: Path, timing_cache: bytes,
                 calibrator=None) -> tuple[bytes, dict]:
    """Build one engine into ``dst``; returns (the updated timing cache, facts for the manifest)."""
    t0 = time.perf_counter()
    builder, network, _parser = _parse(tc, logger, Path(plan.bundle) / ep.onnx)
    config, profiles = _config(tc, builder, plan, ep, timing_cache)
    if calibrator is not None:
        config.int8_calibrator = calibrator
        config.set_calibration_profile(profiles[0])
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgeVLMError(f"TensorRT could not build {ep.engine} (see TensorRT's log above; a larger "
                           "--workspace-gb or a smaller --max-seq / --max-batch may help)")
    write_atomic(dst, serialized)
    io = {network.get_input(i).name: str(network.get_input(i).dtype) for i in range(network.num_inputs)}
    io.update({network.get_output(i).name: str(network.get_output(i).dtype) for i in range(network.num_outputs)})
    facts = {"file": ep.engine, "build_s": round(time.perf_counter() - t0, 1), "bytes": dst.stat().st_size,
             "io_dtypes": io, "layers": network.num_layers}
    return bytes(config.get_timing_cache().serialize()), facts


def build_all(tc: Toolchain, plan: BuildPlan, out_dir: Path, calib_pixels: Callable[[], list] | None = None,
              verbose: bool = False, log: Callable[[str], None] = print) -> dict:
    """Build every engine of ``plan`` into ``out_dir`` (a staging dir); returns manifest facts."""
    trt = tc.trt
    logger = trt.Logger(trt.Logger.INFO if verbose else trt.Logger.WARNING)
    cache_path = Path(plan.timing_cache) if plan.timing_cache else None
    timing = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    facts: dict = {"engines": {}}
    n = len(plan.engines)
    for i, ep in enumerate(plan.engines, 1):
        flags = "+".join(f for f in ep.flags if f != "GPU_FALLBACK") or "fp32"
        where = f", DLA core {ep.dla_core}" if ep.dla_core is not None else ""
        log(f"[{i}/{n}] {ep.graph}: building {ep.engine} ({flags}{where}, {len(ep.profiles)} profile(s)) ...")
        calibrator = None
        if ep.int8 == "calibrate":
            calibrator = _calibrator_for(tc, ep, out_dir, calib_pixels, log)
        timing, facts["engines"][ep.graph] = build_engine(tc, logger, plan, ep, out_dir / ep.engine, timing, calibrator)
        e = facts["engines"][ep.graph]
        log(f"[{i}/{n}] {ep.graph}: done in {e['build_s']:.1f} s ({e['bytes'] / 2**20:.1f} MiB)")
        if cache_path:
            write_atomic(cache_path, timing)  # each engine's tactics help the next build
    return facts


def _calibrator_for(tc: Toolchain, ep: EnginePlan, out_dir: Path, calib_pixels, log):
    cache = out_dir / CALIB_CACHE
    batch = ep.profiles[0].shapes[PIXEL_VALUES].opt[0]
    pixels = calib_pixels() if calib_pixels is not None else []
    batches = calibration_batches(pixels, batch)
    if not batches:
        raise EdgeVLMError(f"int8 calibration needs at least {batch} image(s); got {len(pixels)}")
    log(f"      int8 calibration on {len(batches) * batch} image(s), batch {batch}")
    return make_calibrator(tc, batches, cache)
