"""Validate GGUF files with gguf-py's reader before llama.cpp is handed them (no torch).

llama.cpp aborts the process on some malformed files; these checks turn the mistakes a user can
make -- a truncated download, a file that is not GGUF, an mmproj for another LLM -- into
``BundleError`` with a message that says what is wrong.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BundleError

GGUF_MAGIC = b"GGUF"
# llama.cpp projector types the llamacpp backend drives -> tensor whose width is the output size
# (and the axis of that tensor's ggml shape that holds it), as llama.cpp's clip_n_mmproj_embd reads it
PROJECTOR_OUTPUT = {
    "mlp": ("mm.2.weight", 1),
    "ldp": ("mm.model.mb_block.1.block.2.1.bias", 0),
    "ldpv2": ("mm.model.peg.0.bias", 0),
    "resampler": ("resampler.proj.weight", 0),
    "internvl": ("mm.model.mlp.3.weight", 1),
}


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    arch: str
    fields: dict[str, Any] = field(default_factory=dict)  # scalar and string metadata
    tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)  # name -> ggml shape (ne)

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def _field_value(f) -> Any:
    """A scalar/string field's value; arrays are skipped (tokens lists are large)."""
    import gguf

    if not f.types or f.types[0] == gguf.GGUFValueType.ARRAY:
        return None
    try:
        return f.contents()
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


def read_gguf(path: str | os.PathLike, expect_arch: str | None = None) -> GGUFInfo:
    """Parse ``path``'s header and tensor table; BundleError if it is not a complete GGUF file.

    Results are cached per (path, size, mtime): gguf-py's reader walks every vocabulary string
    (about 2 s for 32000 tokens on a slow CPU), which a process that reopens a bundle pays once.
    """
    p = Path(path).resolve()
    if not p.is_file():
        raise BundleError(f"{p}: no such file")
    st = p.stat()
    info = _read_cached(str(p), st.st_size, st.st_mtime_ns)
    if expect_arch is not None and info.arch != expect_arch:
        raise BundleError(f"{p}: GGUF architecture is {info.arch!r}, expected {expect_arch!r}")
    return info


@functools.lru_cache(maxsize=16)
def _read_cached(path: str, size: int, mtime_ns: int) -> GGUFInfo:
    p = Path(path)
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise BundleError(f"{p}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        import gguf
    except ImportError:
        raise BundleError("reading GGUF files needs the gguf package: pip install 'edgevlm[llamacpp]'") from None
    try:
        reader = gguf.GGUFReader(str(p))
        tensors = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
        fields = {k: _field_value(v) for k, v in reader.fields.items()}
    except Exception as e:  # the reader raises assorted errors on corrupt input: all mean "bad file"
        raise BundleError(f"{p}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from None
    if end > size:
        raise BundleError(f"{p}: truncated GGUF file (tensor data needs {end} bytes, file has {size})")
    arch = fields.get("general.architecture")
    if not isinstance(arch, str):
        raise BundleError(f"{p}: GGUF file has no general.architecture")
    return GGUFInfo(p, arch, {k: v for k, v in fields.items() if v is not None}, tensors)


def check_llm(path: str | os.PathLike) -> GGUFInfo:
    """An LLM GGUF with its embedding width and vocabulary (llama architecture)."""
    info = read_gguf(path, expect_arch="llama")
    if not isinstance(info.get("llama.embedding_length"), int):
        raise BundleError(f"{info.path}: GGUF file has no llama.embedding_length")
    if "token_embd.weight" not in info.tensors:
        raise BundleError(f"{info.path}: GGUF file has no token_embd.weight tensor")
    return info


def mmproj_output_size(info: GGUFInfo) -> int:
    """Width of the visual tokens the mmproj produces (what llama.cpp compares with the LLM)."""
    proj = info.get("clip.projector_type")
    if proj not in PROJECTOR_OUTPUT:
        raise BundleError(f"{info.path}: mmproj projector type {proj!r} is not supported by the "
                          f"llamacpp backend; supported: {', '.join(PROJECTOR_OUTPUT)}")
    name, axis = PROJECTOR_OUTPUT[proj]
    shape = info.tensors.get(name)
    if shape is None or len(shape) <= axis:
        raise BundleError(f"{info.path}: {proj} mmproj lacks tensor {name}")
    return shape[axis]


def check_mmproj(path: str | os.PathLike) -> GGUFInfo:
    info = read_gguf(path, expect_arch="clip")
    if not info.get("clip.has_vision_encoder"):
        raise BundleError(f"{info.path}: mmproj has no vision encoder (clip.has_vision_encoder)")
    mmproj_output_size(info)
    return info


def check_pair(llm_path: str | os.PathLike, mmproj_path: str | os.PathLike) -> tuple[GGUFInfo, GGUFInfo]:
    """Both files valid and the projector's output width equal to the LLM's embedding width."""
    llm, mm = check_llm(llm_path), check_mmproj(mmproj_path)
    d_llm, d_mm = llm.get("llama.embedding_length"), mmproj_output_size(mm)
    if d_llm != d_mm:
        raise BundleError(f"{mm.path.name} projects images to width {d_mm} but {llm.path.name} has "
                          f"hidden size {d_llm}: the mmproj belongs to another model")
    return llm, mm
