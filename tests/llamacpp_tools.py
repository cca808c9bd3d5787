"""llama.cpp's own ``llama-mtmd-cli`` and ``llama-server``, built once from the llama.cpp sources
vendored in the llama-cpp-python sdist the project pins, so tests run the tools a user runs.

Cached per version and flags under ``$XDG_CACHE_HOME/edgevlm/llama.cpp-<version>-<flags hash>/``
(default ``~/.cache``):
``sdist/`` (fetched with ``pip download``) and ``bin/``; ``src/`` and ``build/`` exist only while
building. The build is CPU only, static, native without AMX like the Makefile's llama-cpp-python
build of the same sources (so both run the same kernels), only the two targets: 19.6 minutes measured on 2 cores
that a llama-cpp-python wheel build shared (``build-seconds.txt`` keeps each build's time).

    python tests/llamacpp_tools.py          # build (or find) them and print the bin directory

``tools()`` returns the bin directory or raises ``ToolsUnavailable`` with the reason (no cmake, no
C++ compiler, no network for the sdist, a failed build), which the test fixture turns into a skip.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

TARGETS = ("llama-mtmd-cli", "llama-server")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_CCACHE=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
)
# Native, minus Intel AMX, as the Makefile builds llama-cpp-python: ggml's AMX matmul dies with SIGILL
# on VMs whose CPUID reports AMX that the hypervisor does not enable.
if platform.machine().lower() in ("x86_64", "amd64"):
    _NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    CMAKE_FLAGS += (f"-DCMAKE_C_FLAGS={_NO_AMX}", f"-DCMAKE_CXX_FLAGS={_NO_AMX}")


class ToolsUnavailable(RuntimeError):
    """The tools cannot be built here; the message says why."""


def llama_cpp_python_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        raise ToolsUnavailable("llama-cpp-python is not installed (pip install 'edgevlm[llamacpp]')") from None


def cache_dir(version: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    flags = hashlib.sha256(" ".join(CMAKE_FLAGS).encode()).hexdigest()[:8]  # another build, another dir
    return base / "edgevlm" / f"llama.cpp-{version}-{flags}"


def _run(cmd: list, log: Path, **kw) -> None:
    with open(log, "ab") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n".encode())
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kw).returncode
    if rc != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise ToolsUnavailable(f"{cmd[0]} {cmd[1]} failed (exit {rc}); log {log}:\n{tail}")


def _sources(root: Path, version: str, log: Path) -> Path:
    """The vendored llama.cpp of the llama-cpp-python ``version`` sdist, unpacked under root/src."""
    src = root / "src"
    vendored = src / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (vendored / "CMakeLists.txt").is_file():
        return vendored
    dl = root / "sdist"
    dl.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", f"llama_cpp_python=={version}", "--no-deps",
          "--no-binary", ":all:", "-d", str(dl)], log)
    sdists = sorted(dl.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not sdists:
        raise ToolsUnavailable(f"pip download left no llama_cpp_python-{version}.tar.gz in {dl}")
    shutil.rmtree(src, ignore_errors=True)
    with tarfile.open(sdists[0]) as tar:
        tar.extractall(src, filter="data")
    if not (vendored / "CMakeLists.txt").is_file():
        raise ToolsUnavailable(f"the llama-cpp-python {version} sdist has no vendor/llama.cpp")
    return vendored


def tools(jobs: int = 2) -> Path:
    """The bin directory holding ``TARGETS`` for the installed llama-cpp-python, built if needed."""
    version = llama_cpp_python_version()
    root = cache_dir(version)
    bindir = root / "bin"
    if all((bindir / t).is_file() for t in TARGETS):
        return bindir
    for exe in ("cmake", "c++"):
        if shutil.which(exe) is None:
            raise ToolsUnavailable(f"building llama.cpp's tools needs {exe} on PATH "
                                   "(apt-get install cmake g++, or pip install cmake)")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build per cache dir, other processes wait for it
        if all((bindir / t).is_file() for t in TARGETS):
            return bindir
        log = root / "build.log"
        src = _sources(root, version, log)
        build = root / "build"
        start = time.monotonic()
        _run(["cmake", "-S", str(src), "-B", str(build), *CMAKE_FLAGS], log)
        _run(["cmake", "--build", str(build), "--target", *TARGETS, "-j", str(jobs)], log)
        bindir.mkdir(exist_ok=True)
        for t in TARGETS:
            shutil.copy2(build / "bin" / t, bindir / t)
        (root / "build-seconds.txt").write_text(f"{time.monotonic() - start:.0f}\n")
        for tmp in (build, root / "src"):  # objects and sources; the binaries are static
            shutil.rmtree(tmp, ignore_errors=True)
    return bindir


if __name__ == "__main__":
    try:
        print(tools(int(os.environ.get("JOBS", "2"))))
    except ToolsUnavailable as e:
        sys.exit(f"llama.cpp tools unavailable: {e}")
