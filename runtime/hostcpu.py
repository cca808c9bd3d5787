"""The host CPU: how many cores this process may use, and its SIMD features.

``usable_cpus()`` is the one CPU count every thread default uses ("threads: 0 = all cores"): the
cores this process may run on (its affinity mask, so a container's or ``taskset``'s limit counts),
logical cores included. The SIMD features, read from /proc/cpuinfo (Linux x86 and Arm; empty
elsewhere), decide which kernels ONNX Runtime and llama.cpp pick, and so whether an int8 format is
accurate here: 8-bit u8 x s8 dot products on x86 without VNNI (AVX2, AVX-512 before VNNI) add
pairs of products in saturating 16-bit registers (VPMADDUBSW) and can clip.

Arm64 classes (the kernels MLAS and ggml pick; docs/arm64.md): ``arm64-neon`` (Armv8.0 NEON only:
Cortex-A57, Jetson Nano/TX2), ``arm64-dotprod`` (``asimddp``: Cortex-A76/A78AE, Neoverse-N1, Orin,
most phones), ``arm64-i8mm`` (``i8mm`` or ``sve``: Armv8.6+/Armv9 cores, Jetson Thor class).
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

from .errors import EdgeVLMError

FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
         "amx_tile", "amx_int8", "asimd", "asimddp", "i8mm", "sve", "fphp")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def usable_cpus() -> int:
    """Cores this process may run on (affinity mask where the OS has one, else ``os.cpu_count()``), >= 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def resolve_threads(threads: int | None) -> int:
    """The runtime option ``threads``: None or 0 = every usable core (``usable_cpus``), else itself.
    A negative or non-integer count is an EdgeVLMError."""
    if threads is None:
        return usable_cpus()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise EdgeVLMError(f"threads must be an integer >= 0 (0: all {usable_cpus()} cores), got {threads!r}")
    return threads or usable_cpus()


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
    """``x86-vnni`` | ``x86-avx512`` (no VNNI) | ``x86-avx2`` | ``x86`` | ``arm64-i8mm`` |
    ``arm64-dotprod`` | ``arm64-neon`` | ``arm64`` (no feature list, e.g. macOS) | the machine name."""
    flags = cpu_flags() if flags is None else flags
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return arm_class(flags)
    if machine not in ("x86_64", "amd64"):
        return machine or "unknown"
    if any(f in flags for f in VNNI_FLAGS):
        return "x86-vnni"
    if "avx512f" in flags:
        return "x86-avx512"
    return "x86-avx2" if "avx2" in flags else "x86"


def arm_class(flags: list[str]) -> str:
    """The Arm64 class of an aarch64 CPU reporting ``flags`` (see the module docstring)."""
    if "i8mm" in flags or "sve" in flags:
        return "arm64-i8mm"
    if "asimddp" in flags:
        return "arm64-dotprod"
    return "arm64-neon" if "asimd" in flags else "arm64"


def u8s8_saturates(flags: list[str] | None = None) -> bool:
    """True where ONNX Runtime's full-range u8 x s8 int8 kernels can clip (x86 without VNNI)."""
    return cpu_class(flags) in ("x86-avx512", "x86-avx2", "x86")
