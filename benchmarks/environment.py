"""The environment block of a benchmark run: CPU, cores, RAM, GPU / Jetson, library versions, git
commit, load average, and the host's measured limits (memory read bandwidth, fp32 and bf16 GEMM rates).

Nothing here imports torch or a backend library, so collecting it costs no memory in the parent.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from edgevlm.runtime.bench_target import library_versions as installed_versions
from edgevlm.runtime.hostcpu import cpu_class, cpu_flags

LIBRARIES = ("edgevlm", "numpy", "torch", "transformers", "onnxruntime", "onnx", "llama_cpp_python", "gguf",
             "tensorrt", "psutil", "matplotlib")
REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "processor\t: arm")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gb() -> float:
    try:
        import psutil

        return round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return round(pages / 2**30, 1)


def core_counts() -> dict:
    out = {"logical": os.cpu_count() or 1}
    try:
        out["usable"] = len(os.sched_getaffinity(0))
    except AttributeError:
        out["usable"] = out["logical"]
    try:
        import psutil

        out["physical"] = psutil.cpu_count(logical=False)
    except ImportError:
        pass
    return out


def gpu_info() -> list[dict]:
    """NVIDIA GPUs via nvidia-smi (no CUDA library is loaded here)."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    gpus = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            gpus.append({"name": parts[0], "memory_mb": float(parts[1]), "driver": parts[2]})
    return gpus


def jetson_info() -> dict | None:
    """L4T release and board model on a Jetson (None elsewhere); tegrastats/jtop availability."""
    release = Path("/etc/nv_tegra_release")
    if not release.is_file():
        return None
    model = Path("/proc/device-tree/model")
    return {"l4t": release.read_text().splitlines()[0].strip(),
            "model": model.read_text().strip("\x00\n ") if model.is_file() else "",
            "tegrastats": shutil.which("tegrastats") is not None,
            "jtop": importlib.util.find_spec("jtop") is not None}


def library_versions() -> dict[str, str]:
    return installed_versions(LIBRARIES)


def git_state(repo: Path = REPO) -> dict:
    def git(*args: str) -> str:
        r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=20)
        return r.stdout.strip() if r.returncode == 0 else ""

    try:
        commit = git("rev-parse", "HEAD")
        dirty = len([ln for ln in git("status", "--porcelain").splitlines() if ln.strip()])
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": "", "dirty_files": None}
    return {"commit": commit, "dirty_files": dirty}


def measure_gemm_gflops(n: int = 1024, repeats: int = 5) -> float:
    """fp32 GEMM rate through numpy's BLAS (all threads): the host's achievable compute reference."""
    import numpy as np

    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(repeats))
    return round(2 * n**3 / best / 1e9, 1)


def measure_gemm_bf16_gflops(n: int = 1024, repeats: int = 5) -> float | None:
    """bf16 GEMM rate through PyTorch (oneDNN: AMX or AVX512-BF16 where the CPU has them, else
    converted to fp32), the compute reference of the torch bf16 cases; None without torch."""
    try:
        import torch
    except ImportError:
        return None
    a = torch.rand(n, n, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(repeats))
    return round(2 * n**3 / best / 1e9, 1)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def collect(measure_limits: bool = True, bandwidth_mb: int = 512) -> dict:
    """The environment block (``type: environment``) written first into every results file."""
    env = {
        "type": "environment",
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_class": cpu_class(),
        "cores": core_counts(),
        "ram_gb": memory_gb(),
        "cache_mb": cache_sizes_mb(),
        "gpus": gpu_info(),
        "jetson": jetson_info(),
        "libraries": library_versions(),
        "git": git_state(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if measure_limits:
        from .bandwidth import measure_read_bandwidth

        env["bandwidth"] = measure_read_bandwidth(bandwidth_mb)
        env["gemm_fp32_gflops"] = measure_gemm_gflops()
        env["gemm_bf16_gflops"] = measure_gemm_bf16_gflops()
    env["env_id"] = env_id(env)
    return env


def env_id(env: dict) -> str:
    """A short id of what makes results comparable: hardware, libraries, commit (not the clock)."""
    keys = ("host", "cpu", "cores", "ram_gb", "gpus", "libraries", "git")
    blob = json.dumps({k: env.get(k) for k in keys}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def summary_line(env: dict) -> str:
    bw = env.get("bandwidth", {}).get("read_gbs")
    gpu = ", ".join(g["name"] for g in env.get("gpus") or []) or "no GPU"
    return (f"{env['cpu']} ({env['cores'].get('usable')} usable cores), {env['ram_gb']} GB RAM, {gpu}; "
            f"read bandwidth {bw} GB/s; load {env.get('load_avg_1m')}; commit {env['git'].get('commit', '')[:10]}"
            + (f" (+{env['git']['dirty_files']} changed files)" if env["git"].get("dirty_files") else ""))


def cache_sizes_mb() -> dict[str, float]:
    """CPU cache sizes by level from sysfs (the largest per level), e.g. {"L2": 1.0, "L3": 32.0}."""
    out: dict[str, float] = {}
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = (d / "level").read_text().strip()
            kind = (d / "type").read_text().strip()
            size = (d / "size").read_text().strip()
        except OSError:
            continue
        if kind == "Instruction":
            continue
        mult = {"K": 1 / 1024, "M": 1.0, "G": 1024.0}.get(size[-1:], 1 / 2**20)
        value = float(size.rstrip("KMG")) * mult
        out[f"L{level}"] = max(out.get(f"L{level}", 0.0), round(value, 3))
    return out


class TegraMemorySampler:
    """On a Jetson, samples system RAM in use with ``tegrastats`` (CPU and GPU share that memory,
    so process RSS misses CUDA allocations); ``peak_mb - baseline_mb`` is what a case added."""

    def __init__(self, interval_ms: int = 100):
        self.interval_ms = interval_ms
        self.proc = None
        self.samples: list[float] = []
        self.baseline_mb: float | None = None

    def __enter__(self) -> "TegraMemorySampler":
        import re
        import threading

        if not shutil.which("tegrastats"):
            return self
        self.proc = subprocess.Popen(["tegrastats", "--interval", str(self.interval_ms)],
                                     stdout=subprocess.PIPE, text=True)
        pattern = re.compile(r"RAM (\d+)/(\d+)MB")

        def read() -> None:
            for line in self.proc.stdout:
                m = pattern.search(line)
                if m:
                    self.samples.append(float(m.group(1)))

        threading.Thread(target=read, daemon=True).start()
        time.sleep(self.interval_ms / 1000 * 3)
        self.baseline_mb = self.samples[0] if self.samples else None
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def result(self) -> dict | None:
        if not self.samples:
            return None
        return {"system_ram_baseline_mb": self.baseline_mb, "system_ram_peak_mb": max(self.samples),
                "added_mb": max(self.samples) - (self.baseline_mb or 0), "source": "tegrastats"}


class NvidiaMemorySampler:
    """Samples this process's GPU memory with ``nvidia-smi`` (for backends whose allocator torch
    cannot see: ONNX Runtime CUDA, llama.cpp CUDA); a no-op without nvidia-smi or on Jetson."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s = interval_s
        self.samples: list[float] = []
        self._stop = None

    def __enter__(self) -> "NvidiaMemorySampler":
        import threading

        if not shutil.which("nvidia-smi") or Path("/etc/nv_tegra_release").is_file():
            return self
        self._stop = threading.Event()
        pid = str(os.getpid())
        cmd = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]

        def poll() -> None:
            while not self._stop.wait(self.interval_s):
                try:
                    out = subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout
                except (OSError, subprocess.TimeoutExpired):
                    return
                for line in out.splitlines():
                    parts = [p.strip() for p in line.split(",")]
                    if len(parts) == 2 and parts[0] == pid and parts[1].isdigit():
                        self.samples.append(float(parts[1]))

        threading.Thread(target=poll, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if self._stop is not None:
            self._stop.set()

    def peak_mb(self) -> float | None:
        return max(self.samples) if self.samples else None
