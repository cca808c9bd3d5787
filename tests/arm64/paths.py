"""Where the Arm64 environment lives, and its one error type."""
from __future__ import annotations

import os
from pathlib import Path

SKIP_ENV = "EDGEVLM_SKIP_ARM"


class ArmEnvError(RuntimeError):
    """The Arm64 environment cannot be built or run here; the message says what to install."""


def arm64_cache() -> Path:
    """``$XDG_CACHE_HOME/edgevlm/arm64`` (default ``~/.cache/edgevlm/arm64``); ``EDGEVLM_ARM_CACHE``
    overrides it."""
    if os.environ.get("EDGEVLM_ARM_CACHE"):
        return Path(os.environ["EDGEVLM_ARM_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "edgevlm" / "arm64"


def llama_cpp_python_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        raise ArmEnvError("llama-cpp-python is not installed on the host (pip install 'edgevlm[llamacpp]'): "
                          "its version picks the llama.cpp sources to cross-compile") from None


def non_aarch64_elfs(root: Path) -> list[Path]:
    """ELF files under ``root`` built for another machine than aarch64 (the Arm path runs no x86 code)."""
    bad = []
    for f in root.rglob("*"):
        if f.is_file() and not f.is_symlink() and (f.suffix == ".so" or ".so." in f.name or f.parent.name == "bin"):
            head = f.read_bytes()[:20]
            if head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") != 183:  # EM_AARCH64
                bad.append(f)
    return bad
