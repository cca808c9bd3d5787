"""The bundle format: a directory of target files plus ``manifest.json``.

Every exporter (ONNX, GGUF, TensorRT, Core ML) writes one, through ``BundleWriter``, into a
temporary directory that is renamed into place only when complete; every backend opens one with
``read_manifest``, which refuses unknown format versions and files whose size or sha256 changed.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .configio import from_dict, to_dict
from .errors import BundleError
from .preprocess_config import PreprocessConfig

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class FileEntry:
    path: str  # relative to the bundle root
    role: str  # e.g. vision_encoder, embed_tokens, decoder, tokenizer, llm, mmproj, engine
    size: int = 0
    sha256: str = ""


@dataclass
class ModelSummary:
    preset: str = ""
    integrator: str = ""
    n_visual_tokens: int = 0
    vision_hidden: int = 0
    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 0
    num_layers: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    vocab_size: int = 0
    max_positions: int = 0
    params: dict[str, int] = field(default_factory=dict)


@dataclass
class Manifest:
    target: str  # onnx | gguf | trt | coreml
    model: ModelSummary
    preprocess: PreprocessConfig
    chat_template: str
    tokens: dict[str, Any]  # bos_id, eos_id, pad_id, unk_id, image_token
    files: list[FileEntry] = field(default_factory=list)
    exporter: dict[str, Any] = field(default_factory=dict)  # name, edgevlm version, library versions
    target_info: dict[str, Any] = field(default_factory=dict)  # opset, dtype, quant, engine profiles...
    format_version: int = FORMAT_VERSION

    def file(self, role: str) -> FileEntry:
        for f in self.files:
            if f.role == role:
                return f
        raise BundleError(f"bundle has no {role!r} file; it has: {', '.join(f.role for f in self.files)}")

    def files_with_role(self, role: str) -> list[FileEntry]:
        return [f for f in self.files if f.role == role]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(bundle: str | os.PathLike, verify: bool = True) -> Manifest:
    """Parse and check a bundle's manifest; with ``verify`` also every file's size and sha256."""
    root = Path(bundle)
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{root}: not a bundle (no {MANIFEST})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{path}: invalid JSON ({e})") from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format version {version!r}; this edgevlm reads version "
                          f"{FORMAT_VERSION} (re-export the bundle with a matching edgevlm)")
    try:
        manifest = from_dict(Manifest, data, where=str(path))
    except (TypeError, ValueError) as e:
        raise BundleError(f"{path}: malformed manifest ({e})") from None
    if verify:
        verify_files(root, manifest)
    return manifest


def verify_files(root: Path, manifest: Manifest) -> None:
    for f in manifest.files:
        p = root / f.path
        if not p.is_file():
            raise BundleError(f"{root}: file {f.path} listed in the manifest is missing")
        if p.stat().st_size != f.size:
            raise BundleError(f"{root}: file {f.path} has {p.stat().st_size} bytes, manifest says {f.size} "
                              "(truncated or altered)")
        if sha256_file(p) != f.sha256:
            raise BundleError(f"{root}: file {f.path} does not match its sha256 in the manifest (altered)")


class BundleWriter:
    """Stage a bundle in a temp dir beside ``out``; ``commit(manifest)`` hashes the files, writes the
    manifest and renames into place. Leaving the ``with`` block without commit removes the stage,
    so a killed or failed export never leaves a bundle that looks complete."""

    def __init__(self, out: str | os.PathLike, overwrite: bool = True):
        self.out = Path(out)
        self.overwrite = overwrite
        self.dir: Path | None = None

    def __enter__(self) -> "BundleWriter":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if self.out.exists() and not self.overwrite:
            raise BundleError(f"{self.out} exists (pass overwrite)")
        self.dir = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
        return self

    def path(self, rel: str) -> Path:
        assert self.dir is not None
        p = self.dir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def commit(self, manifest: Manifest) -> Path:
        assert self.dir is not None
        for f in manifest.files:
            p = self.dir / f.path
            f.size, f.sha256 = p.stat().st_size, sha256_file(p)
        manifest.exporter.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        (self.dir / MANIFEST).write_text(json.dumps(to_dict(manifest), indent=2))
        os.chmod(self.dir, 0o755)  # mkdtemp makes it private; a bundle is an ordinary directory
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self.dir, self.out)
        self.dir = None
        return self.out

    def __exit__(self, *exc: object) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
