"""Run the aarch64 Python of the Arm64 environment under qemu-user, as one Arm CPU class.

ONNX Runtime's cpuinfo library parses ``/proc/cpuinfo``, which under qemu-user is the x86 host's, and
segfaults at import. So each run goes in a private mount namespace (``unshare -m``; as a non-root
user ``unshare -rm``) with an Arm-style file for the class bind-mounted over ``/proc/cpuinfo``, and
qemu's ``-cpu`` model of the class (whose HWCAPs the guest's ``getauxval`` reports):

=============  ===============  ==========================================================
class          qemu ``-cpu``    cores it stands for
=============  ===============  ==========================================================
arm64-neon     cortex-a57       Armv8.0 NEON: Jetson Nano/TX2, old phones
arm64-dotprod  neoverse-n1      Armv8.2 + dot product: Orin's A78AE class, most phones
arm64-i8mm     max              Armv8.6+/Armv9 i8mm + SVE: newest phones, Jetson Thor class
=============  ===============  ==========================================================

The guest sees the package as a lean install has it (a shim of links to this checkout, without
``benchmarks``; no torch in the environment), the aarch64 wheels, and for llama.cpp the
cross-built libraries of the class's Arm level. Emulation measures correctness, never speed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paths import ArmEnvError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BASE_FEATURES = "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"


@dataclass(frozen=True)
class ArmClass:
    name: str       # runtime.hostcpu.cpu_class() on it
    qemu_cpu: str   # qemu -cpu model
    level: str      # the cross-built llama.cpp it runs (cross_llamacpp.LEVELS)
    part: str       # MIDR part number in /proc/cpuinfo
    features: str   # /proc/cpuinfo Features (the kernel's names for the model's HWCAPs)


CLASSES = {
    "arm64-neon": ArmClass("arm64-neon", "cortex-a57", "armv8-a", "0xd07", BASE_FEATURES),
    "arm64-dotprod": ArmClass("arm64-dotprod", "neoverse-n1", "armv8.2-a+dotprod", "0xd0c",
                              BASE_FEATURES + " atomics fphp asimdhp asimdrdm lrcpc dcpop asimddp ssbs"),
    "arm64-i8mm": ArmClass("arm64-i8mm", "max", "armv8.2-a+dotprod", "0xd40",
                           BASE_FEATURES + " atomics fphp asimdhp asimdrdm jscvt fcma lrcpc dcpop sha3 asimddp "
                           "sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb dcpodp sve2 flagm2 frint "
                           "svei8mm svebf16 i8mm bf16 dgh bti"),
}


def cpuinfo_text(cls: ArmClass, cores: int) -> str:
    """An aarch64 Linux ``/proc/cpuinfo`` for ``cores`` cores of ``cls``."""
    block = ("processor\t: {i}\nBogoMIPS\t: 50.00\nFeatures\t: {f}\nCPU implementer\t: 0x41\n"
             "CPU architecture: 8\nCPU variant\t: 0x1\nCPU part\t: {p}\nCPU revision\t: 0\n")
    return "\n".join(block.format(i=i, f=cls.features, p=cls.part) for i in range(cores)) + "\n"


def shim(tmp: Path) -> Path:
    """A PYTHONPATH entry with ``edgevlm`` as installed from this checkout, less ``benchmarks`` (the
    device side never imports it; torch is not in the environment at all)."""
    pkg = tmp / "edgevlm"
    pkg.mkdir(parents=True, exist_ok=True)
    links = [("__init__.py", REPO / "edgevlm" / "__init__.py"), ("cli.py", REPO / "edgevlm" / "cli.py")]
    links += [(d, REPO / d) for d in ("runtime", "model", "train", "export")]
    for name, target in links:
        if not (pkg / name).exists():
            (pkg / name).symlink_to(target)
    return tmp


def namespace_cmd() -> list[str]:
    if shutil.which("unshare") is None:
        raise ArmEnvError("running ONNX Runtime under qemu-user needs unshare (apt-get install util-linux)")
    return ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]


def command(env_root: Path, cls: ArmClass, argv: list[str], cpuinfo: Path) -> list[str]:
    """The host command running ``python3.11 argv`` on ``cls`` (qemu inside a private mount namespace)."""
    qemu = env_root / "qemu/usr/bin/qemu-aarch64-static"
    sysroot = env_root / "sysroot"
    inner = ["mount", "--bind", str(cpuinfo), "/proc/cpuinfo", "&&", "exec", str(qemu), "-cpu", cls.qemu_cpu,
             "-L", str(sysroot), str(sysroot / "usr/bin/python3.11"), *argv]
    script = " ".join(a if a == "&&" else _quote(a) for a in inner)
    return [*namespace_cmd(), "sh", "-c", script]


def _quote(a: str) -> str:
    import shlex

    return shlex.quote(str(a))


def run(env_root: Path, cls_name: str, argv: list[str], llama_lib: Path | None = None,
        timeout: float = 1800, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python3.11 argv`` under emulation as class ``cls_name``; raises ArmEnvError with the
    output's tail on a non-zero exit."""
    cls = CLASSES[cls_name]
    with tempfile.TemporaryDirectory(prefix="edgevlm-arm64-") as tmp:
        tmp = Path(tmp)
        cpuinfo = tmp / "cpuinfo"
        cpuinfo.write_text(cpuinfo_text(cls, os.cpu_count() or 1))
        env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8",
               "PYTHONPATH": f"{shim(tmp / 'shim')}:{env_root / 'site'}", "PYTHONNOUSERSITE": "1",
               "PYTHONDONTWRITEBYTECODE": "1",
               "LD_LIBRARY_PATH": "/lib/aarch64-linux-gnu:/usr/lib/aarch64-linux-gnu",
               "EDGEVLM_CACHE": os.environ.get("EDGEVLM_CACHE", str(tmp / "cache"))}
        if llama_lib is not None:  # llama-cpp-python's ctypes loader: the cross-built libraries
            env.update(LLAMA_CPP_LIB_PATH=str(llama_lib), MTMD_CPP_LIB=str(llama_lib))
        env.update(extra_env or {})
        proc = subprocess.run(command(env_root, cls, argv, cpuinfo), env=env, capture_output=True, text=True,
                              timeout=timeout, cwd=tmp)  # not the checkout: `-m` puts the cwd on sys.path
    if proc.returncode != 0:
        raise ArmEnvError(f"emulated {cls.name} ({cls.qemu_cpu}) run of {' '.join(map(str, argv[:3]))} exited "
                          f"{proc.returncode}:\n{(proc.stderr or proc.stdout)[-3000:]}")
    return proc
