"""CUDA and TensorRT on this machine, for the ``trt`` backend and the TensorRT exporter alike: the
libraries' imports (with the install advice when they are missing), a CUDA device with one stream
and the buffers allocated through it (cuda-python's runtime API: ``cuda.bindings.runtime``, or
``cuda.cudart`` in older cuda-python), and the check that engines built for one TensorRT version
and GPU may run on this one. cuda-python and tensorrt are imported only when asked for.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import EdgeVLMError
from .target_info import TrtInfo


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    sm: str  # compute capability, "8.7" on Jetson Orin
    total_memory: int = 0


def version_key(version: str) -> tuple[int, ...]:
    """"10.3.0.30" -> (10, 3, 0): engines are tied to major.minor.patch."""
    parts = [int("".join(c for c in p if c.isdigit()) or 0) for p in str(version).split(".")[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


def compatibility(recorded: TrtInfo, trt_version: str, device: DeviceInfo) -> tuple[list[str], list[str]]:
    """(errors, warnings) for running engines built as ``recorded`` (a TensorRT bundle's
    target_info: TensorRT version and device) with this TensorRT and GPU."""
    errors, warnings = [], []
    built_v, built_dev = recorded.tensorrt, recorded.device
    if version_key(built_v) != version_key(trt_version):
        errors.append(f"built with TensorRT {built_v}, this machine has TensorRT {trt_version}")
    if built_dev.sm != device.sm:
        errors.append(f"built for {built_dev.name or '?'} (SM {built_dev.sm or '?'}), this GPU is "
                      f"{device.name} (SM {device.sm})")
    elif built_dev.name and built_dev.name != device.name:
        warnings.append(f"engines were built on {built_dev.name} and run on {device.name} (same SM "
                        f"{device.sm}): they work, but their tactics were tuned for the other GPU")
    return errors, warnings


def incompatibility_message(root: Path, recorded: TrtInfo, errors: list[str]) -> str:
    src = recorded.source_bundle or "<the ONNX bundle>"
    return (f"{root}: TensorRT engines run only on the TensorRT version and GPU they were built for: "
            f"{'; '.join(errors)}. Rebuild them on this machine: python export/to_trt.py --bundle {src} "
            f"--out <dir>")


def import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise EdgeVLMError("cuda-python (CUDA device memory for TensorRT) is not installed: pip install "
                               "'edgevlm[trt]' (cuda-python; the 12.x line on JetPack 6)") from None
    return cudart


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise EdgeVLMError("TensorRT's Python bindings (module tensorrt) are not installed: on Jetson they come "
                           "with JetPack (apt install python3-libnvinfer; a venv needs --system-site-packages), "
                           "elsewhere pip install tensorrt") from None
    return tensorrt


class Cuda:
    """A CUDA device, one stream, and the device buffers allocated through it."""

    def __init__(self, cudart, device: int = 0):
        self.rt = cudart
        count = self.check(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount", quiet=True)
        if not count:
            raise EdgeVLMError("no CUDA device found (cudaGetDeviceCount returned 0 or failed)")
        if not 0 <= device < count:
            raise EdgeVLMError(f"CUDA device {device} does not exist (this machine has {count})")
        self.check(cudart.cudaSetDevice(device), "cudaSetDevice")
        self.device = device
        self.stream = self.check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        try:
            self.handle = int(self.stream)  # TensorRT takes the stream as an integer handle
        except TypeError:
            self.handle = int(self.stream.getPtr())
        self._allocs: list[int] = []

    def check(self, result, what: str, quiet: bool = False):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            if quiet:
                return None
            name = self.rt.cudaGetErrorName(err)[1]
            raise RuntimeError(f"{what} failed: {name.decode() if isinstance(name, bytes) else name}")
        return rest[0] if len(rest) == 1 else (rest or None)

    def info(self) -> DeviceInfo:
        prop = self.check(self.rt.cudaGetDeviceProperties(self.device), "cudaGetDeviceProperties")
        name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
        return DeviceInfo(name.rstrip("\x00").strip(), f"{prop.major}.{prop.minor}", int(prop.totalGlobalMem))

    def malloc(self, size: int) -> int:
        ptr = int(self.check(self.rt.cudaMalloc(size), f"cudaMalloc({size})"))
        self._allocs.append(ptr)
        return ptr

    def h2d(self, dst: int, array: np.ndarray) -> None:
        a = np.ascontiguousarray(array)  # pageable: the call returns once the host data is staged
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.check(self.rt.cudaMemcpyAsync(dst, a.ctypes.data, a.nbytes, kind, self.stream), "H2D copy")

    def d2d(self, dst: int, src: int, size: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        self.check(self.rt.cudaMemcpyAsync(dst, src, size, kind, self.stream), "D2D copy")

    def d2h(self, out: np.ndarray, src: int) -> np.ndarray:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.check(self.rt.cudaMemcpyAsync(out.ctypes.data, src, out.nbytes, kind, self.stream), "D2H copy")
        self.sync()
        return out

    def sync(self) -> None:
        self.check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        for p in self._allocs:
            self.rt.cudaFree(p)
        self._allocs = []
        if self.stream is not None:
            self.rt.cudaStreamDestroy(self.stream)
            self.stream = None
