"""The Arm64 runtime environment, built from downloads and cached: qemu's user-mode emulator and an
aarch64 Python 3.11 from Debian's packages (``apt-get download`` + ``dpkg -x``, no root filesystem),
and the aarch64 wheels of the lean runtime install (the ``[ort]`` extra plus llama-cpp-python's pure
Python part) from PyPI, unpacked into one site dir.

    python tests/arm64/build_env.py          # build (or find) it; prints the environment's root
    make arm64-env                           # the same, plus the cross-built llama.cpp (slow)

Under ``arm64_cache()`` (``~/.cache/edgevlm/arm64``): ``env-<key>/`` holds ``apt/`` (a private apt
state: no root needed, the host's Debian sources), ``qemu/``, ``sysroot/`` and ``site/``; ``.complete``
is written last, so a half-built environment (no stamp) is removed and rebuilt, never reused. The key
hashes the package lists and constraints.txt, so a change builds a new one.

Root is needed only to install the cross compiler (tests/arm64/cross_llamacpp.py) and for
``unshare -m`` (tests/arm64/emulate.py; or a user namespace: ``unshare -rm``).
"""
from __future__ import annotations

import configparser
import fcntl
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paths import ArmEnvError, arm64_cache, llama_cpp_python_version, non_aarch64_elfs  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PYTHON = "python3.11"
# the aarch64 sysroot: Python and the C/C++ runtime the wheels and the cross-built llama.cpp link to
DEBS = (PYTHON, "libstdc++6", "libgcc-s1", "libgomp1")
# besides the [ort] extra and the runtime's install_requires: llama-cpp-python's Python deps (its
# ctypes layer loads the cross-built libraries; its own package comes from the sdist)
LLAMACPP_PY_DEPS = ("typing_extensions", "diskcache", "Jinja2", "MarkupSafe")
# every manylinux tag up to glibc 2.36 (Debian 12's, the sysroot's): pip takes only the tags named
# (numpy 2.4's aarch64 wheels are manylinux_2_27/2_28, so manylinux2014_aarch64 alone finds none)
WHEEL_PLATFORMS = ("manylinux2014_aarch64", "manylinux_2_24_aarch64", "manylinux_2_27_aarch64",
                   "manylinux_2_28_aarch64", "manylinux_2_31_aarch64", "manylinux_2_34_aarch64",
                   "manylinux_2_35_aarch64", "manylinux_2_36_aarch64")
STAMP = ".complete"


def _requirements() -> list[str]:
    """install_requires + the [ort] and [llamacpp] extras of setup.cfg (re-read each build: extras
    change), less llama-cpp-python (no aarch64 wheel: its Python part comes from the sdist)."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    extras = cfg["options.extras_require"]
    lines = cfg["options"]["install_requires"].splitlines() + extras["ort"].splitlines() + extras["llamacpp"].splitlines()
    reqs = [ln.split("#")[0].strip() for ln in lines]
    reqs = [r for r in reqs if r and not r.lower().replace("_", "-").startswith("llama-cpp-python")]
    return list(dict.fromkeys(reqs)) + list(LLAMACPP_PY_DEPS)


def env_key() -> str:
    text = "\n".join([*DEBS, *_requirements(), (REPO / "constraints.txt").read_text(), *WHEEL_PLATFORMS])
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def env_root() -> Path:
    return arm64_cache() / f"env-{env_key()}"


def found() -> Path | None:
    root = env_root()
    return root if (root / STAMP).is_file() else None


def _run(cmd: list, log: Path, what: str) -> str:
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise ArmEnvError(f"{what} needs {cmd[0]} (apt-get install {cmd[0]})") from None
    with open(log, "a") as f:
        f.write(out.stdout + out.stderr)
    if out.returncode != 0:
        raise ArmEnvError(f"{what} failed (exit {out.returncode}; is the Debian/PyPI mirror reachable?): "
                          f"{(out.stderr or out.stdout).strip()[-600:]} (log {log})")
    return out.stdout


def _apt(root: Path) -> list[str]:
    """apt-get with a private state under root/apt (the host's sources and keys): runs without root."""
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise ArmEnvError("the Arm64 environment comes from Debian packages: it needs apt-get and dpkg "
                          "(a Debian or Ubuntu host)")
    state = root / "apt"
    for d in ("lists/partial", "archives/partial"):
        (state / d).mkdir(parents=True, exist_ok=True)
    (state / "status").touch()
    host = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
    opts = {"Dir::State": state, "Dir::State::Lists": state / "lists", "Dir::State::status": state / "status",
            "Dir::Cache": state, "Dir::Cache::archives": state / "archives", "APT::Architecture": host,
            "APT::Architectures": f"{host},arm64", "Debug::NoLocking": "1", "APT::Get::AllowUnauthenticated": "0"}
    if os.geteuid() == 0:  # else apt drops to the _apt user, who cannot write here
        opts["APT::Sandbox::User"] = "root"
    return ["apt-get", "-q"] + [a for k, v in opts.items() for a in ("-o", f"{k}={v}")]


def debian_parts(root: Path, log: Path) -> None:
    """qemu-user-static (host arch) and the aarch64 sysroot, unpacked with dpkg -x."""
    apt = _apt(root)
    _run([*apt, "update"], log, "apt-get update (Debian package lists)")
    arch = root / "apt" / "archives"
    _run([*apt, "install", "-y", "--download-only", "--no-install-recommends",
          *(f"{d}:arm64" for d in DEBS)], log, "downloading Debian's arm64 Python packages")
    subprocess.run(["rm", "-f", *map(str, arch.glob("qemu-user-static_*"))])
    cwd = os.getcwd()
    try:
        os.chdir(arch)
        _run([*apt, "download", "qemu-user-static"], log, "apt-get download qemu-user-static")
    finally:
        os.chdir(cwd)
    for deb in sorted(arch.glob("*.deb")):
        if not deb.name.endswith(("_arm64.deb", "_all.deb")) and not deb.name.startswith("qemu-user-static_"):
            continue  # host-arch helpers apt resolved (dpkg ...): no x86 code in the Arm sysroot
        dest = root / ("qemu" if deb.name.startswith("qemu-user-static_") else "sysroot")
        _run(["dpkg", "-x", str(deb), str(dest)], log, f"dpkg -x {deb.name}")
    if not (root / "qemu/usr/bin/qemu-aarch64-static").is_file():
        raise ArmEnvError("qemu-user-static left no qemu-aarch64-static (apt-get install qemu-user-static)")
    for other in (root / "qemu").rglob("*"):  # keep the one emulator (the package has ~30, 370 MB)
        if other.is_file() and other.name != "qemu-aarch64-static":
            other.unlink()
    if not (root / "sysroot/usr/bin" / PYTHON).is_file():
        raise ArmEnvError(f"Debian's arm64 packages left no {PYTHON} in the sysroot")
    shutil.rmtree(root / "apt" / "lists", ignore_errors=True)  # 100+ MB of package lists


def wheels(root: Path, log: Path) -> None:
    """The aarch64 wheels of the lean runtime, unpacked into root/site; llama_cpp's Python package
    from the pinned sdist (its libraries are cross-built: cross_llamacpp.py)."""
    dl, site = root / "wheels", root / "site"
    dl.mkdir(exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "-q", "-d", str(dl), "--only-binary=:all:",
          *(a for p in WHEEL_PLATFORMS for a in ("--platform", p)), "--python-version", "3.11", "--implementation", "cp",
          "-c", str(REPO / "constraints.txt"), *_requirements()], log, "pip download (aarch64 wheels)")
    for whl in sorted(dl.glob("*.whl")):
        if re.search(r"(x86_64|amd64|win|macosx)", whl.name):
            raise ArmEnvError(f"pip picked a non-aarch64 wheel {whl.name}")
        with zipfile.ZipFile(whl) as z:
            z.extractall(site)
    _llama_cpp_py(root, site, log)


def _llama_cpp_py(root: Path, site: Path, log: Path) -> None:
    """llama-cpp-python's Python package (no libraries) from the pinned version's sdist."""
    import tarfile

    version = llama_cpp_python_version()
    dl = root / "sdist"
    dl.mkdir(exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "-q", f"llama_cpp_python=={version}", "--no-deps",
          "--no-binary", ":all:", "-d", str(dl)], log, "pip download llama-cpp-python (sdist)")
    prefix = f"llama_cpp_python-{version}/llama_cpp/"
    with tarfile.open(dl / f"llama_cpp_python-{version}.tar.gz") as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
        for m in members:
            m.name = m.name[len(f"llama_cpp_python-{version}/"):]
        tar.extractall(site, members=members, filter="data")
    meta = site / f"llama_cpp_python-{version}.dist-info"
    meta.mkdir(exist_ok=True)
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: llama_cpp_python\nVersion: {version}\n")
    shutil.rmtree(dl)


def build() -> Path:
    """The environment's root, built if missing or half-built."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise ArmEnvError(f"the emulated Arm64 environment is for x86-64 hosts (this is {platform.machine()})")
    if found():
        return env_root()
    root = env_root()
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".lock-{root.name}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; others wait and reuse it
        if found():
            return root
        shutil.rmtree(root, ignore_errors=True)  # a half-built one (no stamp) is rebuilt
        root.mkdir()
        log = root / "build.log"
        debian_parts(root, log)
        wheels(root, log)
        bad = non_aarch64_elfs(root / "sysroot") + non_aarch64_elfs(root / "site")
        if bad:
            raise ArmEnvError(f"non-aarch64 binaries in the Arm environment: {', '.join(map(str, bad[:5]))}")
        shutil.rmtree(root / "wheels", ignore_errors=True)
        shutil.rmtree(root / "apt" / "archives", ignore_errors=True)
        (root / STAMP).write_text(env_key() + "\n")
    return root


if __name__ == "__main__":
    try:
        print(build())
    except ArmEnvError as e:
        sys.exit(f"arm64 environment: {e}")
