"""The host CPU's SIMD features, read from /proc/cpuinfo (Linux x86 and Arm; empty elsewhere).

They decide which kernels ONNX Runtime and llama.cpp pick, and so whether an int8 format is
accurate here: 8-bit u8 x s8 dot products on x86 without VNNI (AVX2, AVX-512 before VNNI) add
pairs of products in saturating 16-bit registers (VPMADDUBSW) and can clip.
"""
from __future__ import annotations

import platform
from pathlib import Path

FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
         "amx_tile", "amx_int8", "asimd", "asimddp", "i8mm", "sve", "fphp")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags() -> list[str]:
    """The features in ``FLAGS`` this CPU reports (x86 AVX family, Arm NEON/dotprod/i8mm)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    found = set()
    for line in text.splitlines():
        if line.lower().startswith(("flags", "features")):
            found.update(line.split(":", 1)[1].split())
    return [f for f in FLAGS if f in found]


def cpu_class(flags: list[str] | None = None) -> str:
    """``x86-vnni`` | ``x86-avx512`` (no VNNI) | ``x86-avx2`` | ``x86`` | ``arm64`` | the machine name."""
    flags = cpu_flags() if flags is None else flags
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return "arm64"
    if machine not in ("x86_64", "amd64"):
        return machine or "unknown"
    if any(f in flags for f in VNNI_FLAGS):
        return "x86-vnni"
    if "avx512f" in flags:
        return "x86-avx512"
    return "x86-avx2" if "avx2" in flags else "x86"


def u8s8_saturates(flags: list[str] | None = None) -> bool:
    """True where ONNX Runtime's full-range u8 x s8 int8 kernels can clip (x86 without VNNI)."""
    return cpu_class(flags) in ("x86-avx512", "x86-avx2", "x86")
