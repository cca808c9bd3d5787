"""The bundle format: a directory of target files plus ``manifest.json``.

Every exporter (ONNX, GGUF, TensorRT, Core ML) writes one, through ``BundleWriter``, into a
temporary directory that is renamed into place only when complete; every backend opens one with
``read_manifest``, which refuses other format versions, malformed fields (naming the field) and
files whose size or sha256 changed.

The manifest is typed throughout: the model summary, the preprocessing, the chat template as its
pieces (``ChatTemplate``: a bundle runs without the runtime knowing the template's name), the
special token ids (``TokenConfig``, the model config's own type), the exporter, and the target's
facts (``target_info``: the ``runtime.target_info`` dataclass of ``target``).

Format versions: 1 stored the template by name and the token ids and target facts as free
mappings; 2 (this edgevlm) types them. A version-1 bundle is refused with a message to re-export
it: exporting is one command, and a second reader would keep the free mappings alive.
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

from .chat import ChatTemplate
from .configio import from_dict, to_dict
from .errors import BundleError, EdgeVLMError
from .preprocess_config import PreprocessConfig
from .target_info import BUNDLE_TARGETS, TARGET_INFO, TargetInfo
from .tokenizer import TokenConfig

FORMAT_VERSION = 2
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
class ExporterInfo:
    name: str  # the module that wrote the bundle
    versions: dict[str, str] = field(default_factory=dict)  # library -> version
    created: str = ""  # ISO time, set on commit


@dataclass
class Manifest:
    target: str  # onnx | gguf | trt | coreml (torch: a model dir, in memory only)
    model: ModelSummary
    preprocess: PreprocessConfig
    chat_template: ChatTemplate
    tokens: TokenConfig
    target_info: TargetInfo  # the runtime.target_info dataclass of ``target``
    files: list[FileEntry] = field(default_factory=list)
    exporter: ExporterInfo = field(default_factory=lambda: ExporterInfo(""))
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        want = TARGET_INFO.get(self.target)
        if want is None:
            raise BundleError(f"unknown bundle target {self.target!r}; valid: {', '.join(TARGET_INFO)}")
        if not isinstance(self.target_info, want):
            raise TypeError(f"a {self.target!r} manifest needs target_info of type {want.__name__}, "
                            f"got {type(self.target_info).__name__}")

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
    manifest = manifest_from_dict(data, str(path))
    if verify:
        verify_files(root, manifest)
    return manifest


def manifest_from_dict(data: Any, where: str = MANIFEST) -> Manifest:
    """The typed manifest of parsed ``manifest.json`` data; BundleError naming what is wrong."""
    version = data.get("format_version") if isinstance(data, dict) else None
    target = data.get("target") if isinstance(data, dict) else None
    if version != FORMAT_VERSION:
        old = " (its template, token ids and target facts are untyped)" if version == 1 else ""
        raise BundleError(f"{where}: bundle format version {version!r}{old}; this edgevlm reads version "
                          f"{FORMAT_VERSION}: re-export the bundle with this edgevlm ({_export_command(target)})")
    info_cls = TARGET_INFO.get(target) if isinstance(target, str) else None
    if info_cls is None or target == "torch":
        raise BundleError(f"{where}: unknown bundle target {target!r}; valid: "
                          f"{', '.join(t for t in TARGET_INFO if t != 'torch')}")
    try:
        info = from_dict(info_cls, data.get("target_info", {}), where="target_info")
        return from_dict(Manifest, {**data, "target_info": info}, where="")
    except (EdgeVLMError, TypeError, ValueError) as e:
        detail = str(e).removeprefix("config ")
        raise BundleError(f"{where}: malformed manifest: {detail} (re-export the bundle)") from None


def _export_command(target: Any) -> str:
    if target == "trt":
        return "edgevlm export trt --bundle ONNX_BUNDLE --out DIR, on the device"
    name = target if target in BUNDLE_TARGETS else "<target>"
    return f"edgevlm export {name} --model MODEL_DIR --out DIR"


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
        if not manifest.exporter.created:
            manifest.exporter.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
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
