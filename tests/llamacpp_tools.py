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
C++ compiler, no network for the sdist, a failed build). ``tools_for_tests()`` turns that into a test
failure: a broken build must not leave the suite green. Setting ``EDGEVLM_SKIP_LLAMACPP_TOOLS=1``
opts out: nothing is built, and the tests that need the tools run only if they are already built
(cached), else they skip with a message naming the variable.
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
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" if platform.machine().lower() in ("x86_64", "amd64") else ""
if NO_AMX:
    CMAKE_FLAGS += (f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}")


SKIP_ENV = "EDGEVLM_SKIP_LLAMACPP_TOOLS"


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


def run_logged(cmd: list, log: Path, error: type[Exception] = None, **kw) -> None:
    """Run ``cmd`` with its output appended to ``log``; a failure raises ``error`` (default
    ToolsUnavailable) with the log's tail."""
    with open(log, "ab") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n".encode())
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kw).returncode
    if rc != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise (error or ToolsUnavailable)(f"{Path(cmd[0]).name} {cmd[1]} failed (exit {rc}); log {log}:\n{tail}")


def _cmake() -> str:
    """cmake on PATH, or beside this Python (``pip install cmake`` into a venv not activated); a C++
    compiler on PATH."""
    if shutil.which("c++") is None:
        raise ToolsUnavailable("building llama.cpp's tools needs a C++ compiler on PATH (apt-get install g++)")
    for found in (shutil.which("cmake"), shutil.which("cmake", path=str(Path(sys.executable).parent))):
        if found:
            return found
    raise ToolsUnavailable("building llama.cpp's tools needs cmake (apt-get install cmake, or pip install cmake)")


def sdist_sources(root: Path, version: str, log: Path, error: type[Exception] = None) -> Path:
    """The vendored llama.cpp of the llama-cpp-python ``version`` sdist, unpacked under root/src
    (shared with the aarch64 cross build, tests/arm64/cross_llamacpp.py)."""
    error = error or ToolsUnavailable
    src = root / "src"
    vendored = src / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (vendored / "CMakeLists.txt").is_file():
        return vendored
    dl = root / "sdist"
    dl.mkdir(parents=True, exist_ok=True)
    if not list(dl.glob(f"llama_cpp_python-{version}.tar.gz")):
        run_logged([sys.executable, "-m", "pip", "download", f"llama_cpp_python=={version}", "--no-deps",
                    "--no-binary", ":all:", "-d", str(dl)], log, error)
    sdists = sorted(dl.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not sdists:
        raise error(f"pip download left no llama_cpp_python-{version}.tar.gz in {dl}")
    shutil.rmtree(src, ignore_errors=True)
    with tarfile.open(sdists[0]) as tar:
        tar.extractall(src, filter="data")
    if not (vendored / "CMakeLists.txt").is_file():
        raise error(f"the llama-cpp-python {version} sdist has no vendor/llama.cpp")
    return vendored


def build(src: Path, root: Path, jobs: int = 2) -> Path:
    """Configure and build ``TARGETS`` from the llama.cpp sources ``src`` into ``root/bin``; the log is
    ``root/build.log``. Any failure raises ``ToolsUnavailable`` with the log's tail."""
    cmake = _cmake()
    log, out, bindir = root / "build.log", root / "build", root / "bin"
    start = time.monotonic()
    run_logged([cmake, "-S", str(src), "-B", str(out), *CMAKE_FLAGS], log)
    run_logged([cmake, "--build", str(out), "--target", *TARGETS, "-j", str(jobs)], log)
    bindir.mkdir(exist_ok=True)
    for t in TARGETS:
        shutil.copy2(out / "bin" / t, bindir / t)
    (root / "build-seconds.txt").write_text(f"{time.monotonic() - start:.0f}\n")
    for tmp in (out, root / "src"):  # objects and sources; the binaries are static
        shutil.rmtree(tmp, ignore_errors=True)
    return bindir


def built(root: Path) -> Path | None:
    """``root/bin`` if it holds every target, else None."""
    bindir = root / "bin"
    return bindir if all((bindir / t).is_file() for t in TARGETS) else None


def tools(jobs: int = 2) -> Path:
    """The bin directory holding ``TARGETS`` for the installed llama-cpp-python, built if needed."""
    root = cache_dir(llama_cpp_python_version())
    if built(root):
        return root / "bin"
    _cmake()  # fail before fetching the sources
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build per cache dir, other processes wait for it
        if built(root):
            return root / "bin"
        return build(sdist_sources(root, llama_cpp_python_version(), root / "build.log"), root, jobs)


def tools_for_tests(find=tools) -> Path:
    """``find()`` for a test fixture: a failure to build is the test's failure, unless ``SKIP_ENV`` is
    set; then nothing is built, already built tools are used, and without them the test skips."""
    import pytest

    if os.environ.get(SKIP_ENV, "") not in ("", "0"):
        try:
            bindir = built(cache_dir(llama_cpp_python_version()))
        except ToolsUnavailable:
            bindir = None
        if bindir is None:
            pytest.skip(f"llama.cpp's tools are not built and {SKIP_ENV}={os.environ[SKIP_ENV]} says not to "
                        "build them (unset it to build them: about 20 minutes on 2 cores, once)")
        return bindir
    try:
        return find()
    except ToolsUnavailable as e:
        pytest.fail(f"llama.cpp's tools did not build: {e}\nFix the build, or set {SKIP_ENV}=1 to skip the "
                    "tests that need them.", pytrace=False)


if __name__ == "__main__":
    try:
        print(tools(int(os.environ.get("JOBS", "2"))))
    except ToolsUnavailable as e:
        sys.exit(f"llama.cpp tools unavailable: {e}")
