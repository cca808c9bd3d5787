"""llama.cpp for aarch64: ``libllama``/``libmtmd`` (shared, loaded by llama-cpp-python's ctypes
layer; ``llama-mtmd-cli`` too with ``EDGEVLM_ARM_CLI=1``), cross-compiled from the llama.cpp sources vendored in the pinned
llama-cpp-python sdist (the same sources ``tests/llamacpp_tools.py`` builds the x86 tools from) with
Debian's aarch64 cross toolchain, once per Arm level:

- ``armv8-a``: Armv8.0 NEON only (cortex-a57: Jetson Nano/TX2, old phones)
- ``armv8.2-a+dotprod``: the dot-product kernels (Orin's Cortex-A78AE, most phones, and newer cores)

Cached under ``<arm64 cache>/llama.cpp-<version>-<level>/lib`` (``lib/.complete`` stamps a finished
build; anything else is rebuilt; an interrupted build's objects are reused). No host (x86) object goes in: the compiler is
``aarch64-linux-gnu-gcc`` (``apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu``, as root).
About 15-20 minutes per level on 2 shared cores.

    python tests/arm64/cross_llamacpp.py [LEVEL ...]   # build (or find) them, print the lib dirs
"""
from __future__ import annotations

import fcntl
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llamacpp_tools import run_logged, sdist_sources  # noqa: E402
from paths import ArmEnvError, arm64_cache, llama_cpp_python_version  # noqa: E402

LEVELS = ("armv8-a", "armv8.2-a+dotprod")
TARGETS = ("llama", "mtmd")  # what llama-cpp-python's ctypes layer loads
CLI = "llama-mtmd-cli"  # also built with EDGEVLM_ARM_CLI=1 (pulls in llama.cpp's common/: slower)
CC, CXX = "aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++"
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_CCACHE=OFF", "-DGGML_NATIVE=OFF",
    "-DGGML_OPENMP=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
    f"-DCMAKE_C_COMPILER={CC}", f"-DCMAKE_CXX_COMPILER={CXX}",
    "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON", "-DCMAKE_INSTALL_RPATH=$ORIGIN",
)
STAMP = ".complete"


def lib_dir(level: str, version: str | None = None) -> Path:
    return arm64_cache() / f"llama.cpp-{version or llama_cpp_python_version()}-{level}" / "lib"


def built(level: str) -> Path | None:
    """The lib dir of a finished build of ``level``, else None."""
    d = lib_dir(level)
    return d if (d / STAMP).is_file() else None


def _run(cmd: list, log: Path, **kw) -> None:
    run_logged(cmd, log, ArmEnvError, **kw)


def _toolchain() -> str:
    missing = [c for c in (CC, CXX) if shutil.which(c) is None]
    if missing:
        raise ArmEnvError(f"cross-compiling llama.cpp for aarch64 needs {' and '.join(missing)} "
                          "(as root: apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)")
    cmake = shutil.which("cmake") or shutil.which("cmake", path=str(Path(sys.executable).parent))
    if not cmake:
        raise ArmEnvError("cross-compiling llama.cpp needs cmake (apt-get install cmake, or pip install cmake)")
    return cmake


def sources(version: str, log: Path) -> Path:
    """llama.cpp as vendored in the llama-cpp-python ``version`` sdist (shared by every level)."""
    return sdist_sources(arm64_cache() / f"llama-cpp-python-{version}", version, log, ArmEnvError)


def build(level: str, jobs: int = 2) -> Path:
    """Cross-build ``TARGETS`` for ``level`` into its lib dir (cached)."""
    if level not in LEVELS:
        raise ArmEnvError(f"unknown Arm level {level!r}; one of {', '.join(LEVELS)}")
    if built(level):
        return lib_dir(level)
    cmake = _toolchain()
    version = llama_cpp_python_version()
    out = lib_dir(level)
    root = out.parent
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if built(level):
            return out
        log, bdir = root / "build.log", root / "build"
        src = sources(version, log)
        start = time.monotonic()
        shutil.rmtree(out, ignore_errors=True)  # an interrupted build's objects in bdir are reused
        targets = [*TARGETS, CLI] if os.environ.get("EDGEVLM_ARM_CLI") else list(TARGETS)
        _run([cmake, "-S", str(src), "-B", str(bdir), *CMAKE_FLAGS, f"-DGGML_CPU_ARM_ARCH={level}"], log)
        _run([cmake, "--build", str(bdir), "--target", *targets, "-j", str(jobs)], log)
        out.mkdir()
        for so in (bdir / "bin").glob("lib*.so*"):
            shutil.copy2(so, out / so.name, follow_symlinks=True)
        if CLI in targets:
            shutil.copy2(bdir / "bin" / CLI, out / CLI)
        _check_aarch64(out)
        (root / "build-seconds.txt").write_text(f"{time.monotonic() - start:.0f}\n")
        shutil.rmtree(bdir, ignore_errors=True)
        (out / STAMP).write_text(f"{level}\n")
    return out


def _check_aarch64(out: Path) -> None:
    """Every built file is an aarch64 ELF (no host object reached the Arm path)."""
    for f in out.iterdir():
        head = f.read_bytes()[:20]
        if head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") != 183:  # EM_AARCH64
            raise ArmEnvError(f"{f} is not an aarch64 binary")
    if not (out / "libllama.so").is_file() or not (out / "libmtmd.so").is_file():
        raise ArmEnvError(f"the cross build left no libllama.so/libmtmd.so in {out}")


if __name__ == "__main__":
    try:
        for lv in sys.argv[1:] or LEVELS:
            print(build(lv, int(os.environ.get("JOBS", "2"))))
    except ArmEnvError as e:
        sys.exit(f"arm64 llama.cpp: {e}")
