"""Core ML bundle for iPhone / Mac: VisionEncoder + stateful Decoder ML Programs (iOS 18 / macOS 15).

Example:
    python export/to_coreml.py --model runs/tiny/final --out bundles/tiny-coreml --weights int4

Writes ``VisionEncoder.mlpackage`` (pixel_values -> image_features: vision tower + integrator),
``Decoder.mlpackage`` (inputs_embeds + causal_mask -> logits, the KV cache held as Core ML state),
``embed_tokens.npy`` (the fp16 embedding table the app indexes to embed tokens), the tokenizer
and ``manifest.json`` (every file of every package with its sha256). --weights int8 / int4
compresses weights with coremltools.optimize (int8 per channel; int4 in blocks of 32, with the
vision encoder kept at int8). On macOS the packages are run against PyTorch and the result is
recorded; elsewhere coremltools can convert but not predict, so that check is recorded as skipped.
Swift usage: docs/coreml_swift.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgevlm.export.coreml_compress import WEIGHT_MODES as WEIGHTS  # light: no coremltools at import
from edgevlm.runtime.errors import EdgeVLMError
from edgevlm.runtime.graph_io import (
    CAUSAL_MASK, IMAGE_FEATURES, INPUTS_EMBEDS, KEY_CACHE, LOGITS, PIXEL_VALUES, VALUE_CACHE,
)

PACKAGES = {"vision_encoder": "VisionEncoder.mlpackage", "decoder": "Decoder.mlpackage"}
EMBED_FILE = "embed_tokens.npy"
DEPLOYMENT = {"target": "iOS18", "iOS": "18.0", "macOS": "15.0", "format": "mlprogram"}
# Bounds on max |coreml - torch| / max |torch| (image features, logits) per weight mode. Calibrated in
# PyTorch on the small random tiny model: fp16 compute alone 0.001, the int8 / int4 packages'
# dequantized weights 0.014 / 0.18 on logits; Core ML's own fp16 kernels get the remaining margin.
TOLERANCES = {"fp16": 0.02, "int8": 0.05, "int4": 0.3}
NO_PREDICT_REASON = "coremltools can run Core ML predictions only on macOS (conversion works everywhere)"


def can_predict() -> bool:
    """True where coremltools has Core ML's runtime (macOS with its native library)."""
    if sys.platform != "darwin":
        return False
    try:
        from coremltools.models import model as _m

        return getattr(_m, "_MLModelProxy", None) is not None
    except ImportError:
        return False


def resolve_max_context(model, max_context: int | None) -> int:
    limit = model.cfg.llm.max_position_embeddings
    need = model.n_visual_tokens + 2
    c = limit if max_context is None else max_context
    if not need <= c <= limit:
        raise EdgeVLMError(f"--max-context must be between {need} (image tokens + 2) and the model's "
                           f"max_position_embeddings {limit}, got {c}")
    return c


def package_entries(root: Path, package: str, role: str) -> list:
    """One FileEntry per file inside an .mlpackage directory (so sha256 covers all of it)."""
    from edgevlm.runtime.manifest import FileEntry

    files = sorted(p for p in (root / package).rglob("*") if p.is_file())
    return [FileEntry(p.relative_to(root).as_posix(), role) for p in files]


def write_embeddings(model, path: Path) -> dict[str, Any]:
    """The token embedding table as fp16 .npy [V, D]; ``data_offset`` lets Swift mmap past the header."""
    import numpy as np

    table = model.llm.get_input_embeddings().weight.detach().float().numpy().astype(np.float16)
    np.save(path, np.ascontiguousarray(table))
    offset = path.stat().st_size - table.nbytes
    return {"file": path.name, "shape": list(table.shape), "dtype": "float16", "order": "C (row = token id)",
            "data_offset": offset}


@dataclass
class Converted:
    """Both packages converted at fp16 (every --weights variant starts from these)."""

    max_context: int
    models: dict[str, Any]  # package role -> coremltools MLModel
    convert_s: dict[str, float]


def convert_fp16(model, max_context: int | None = None, bar=None) -> Converted:
    from .coreml_decoder import convert_decoder
    from .coreml_vision import convert_vision

    max_context = resolve_max_context(model, max_context)
    steps = (("vision_encoder", lambda: convert_vision(model)),
             ("decoder", lambda: convert_decoder(model.llm, max_context)))
    out = Converted(max_context, {}, {})
    for name, convert in steps:
        if bar is not None:
            bar.set_postfix_str(f"{name}: convert")
        t0 = time.perf_counter()
        out.models[name] = convert()
        out.convert_s[name] = round(time.perf_counter() - t0, 1)
        if bar is not None:
            bar.update(1)
    return out


def compress_packages(converted: Converted, weights: str, bar=None) -> tuple[dict, dict]:
    """(role -> compressed MLModel, role -> compression facts)."""
    from .coreml_compress import compress, package_modes

    models, info = {}, {}
    for name, mode in package_modes(weights).items():
        if bar is not None:
            bar.set_postfix_str(f"{name}: {mode}")
        t0 = time.perf_counter()
        models[name], info[name] = compress(converted.models[name], mode)
        info[name].update(convert_s=converted.convert_s[name], compress_s=round(time.perf_counter() - t0, 1))
    return models, info


def export_coreml(model, out: str | Path, weights: str = "fp16", max_context: int | None = None,
                  source: str | None = None, progress: bool = True, validate: bool = True,
                  converted: Converted | None = None) -> Path:
    """Write a Core ML bundle to ``out`` (appears only when complete). ``converted`` (from
    ``convert_fp16``) lets several --weights variants share one conversion."""
    if weights not in WEIGHTS:
        raise EdgeVLMError(f"--weights must be one of {WEIGHTS}, got {weights!r}")
    from .common import require_exportable

    require_exportable(model, "coreml")
    max_context = resolve_max_context(model, max_context)  # before the heavy imports: fail fast
    from tqdm.auto import tqdm

    import coremltools as ct

    from edgevlm.runtime.manifest import BundleWriter, FileEntry

    from .common import base_manifest, copy_tokenizer

    if converted is not None and converted.max_context != max_context:
        raise ValueError(f"converted packages have max_context {converted.max_context}, not {max_context}")
    t0 = time.perf_counter()
    bar = tqdm(total=len(PACKAGES) + 2, desc="coreml export", disable=not progress)
    with BundleWriter(out) as writer:
        if converted is None:
            converted = convert_fp16(model, max_context, bar)
        else:
            bar.update(len(PACKAGES))
        models, compression = compress_packages(converted, weights, bar)
        bar.set_postfix_str("save")
        files: list[FileEntry] = []
        for name, mlmodel in models.items():
            mlmodel.save(str(writer.path(PACKAGES[name])))
            files += package_entries(writer.dir, PACKAGES[name], name)
        embed = write_embeddings(model, writer.path(EMBED_FILE))
        files.append(FileEntry(EMBED_FILE, "embed_tokens"))
        files += copy_tokenizer(model, writer)
        bar.update(1)
        bar.set_postfix_str("validate")
        validation = _validation(model, writer.dir, weights) if validate else {"skipped": "disabled"}
        info = _target_info(model, weights, max_context, compression, embed, coremltools=ct.__version__,
                            validation=validation, source=source or "", export_s=round(time.perf_counter() - t0, 1))
        manifest = base_manifest(model, "coreml", files, "edgevlm.export.to_coreml", ("coremltools",), info)
        path = writer.commit(manifest)
        bar.update(1)
    bar.close()
    return path


def _target_info(model, weights: str, max_context: int, compression: dict, embed: dict, **facts: Any):
    """The manifest's ``CoremlInfo``; ``facts``: coremltools, validation, source, export_s."""
    from edgevlm.runtime.target_info import CoremlEmbeddings, CoremlInfo

    from .coreml_decoder import MASK_MIN, DecoderDims
    from .coreml_vision import vision_io_spec

    dims = DecoderDims.of(model.llm, max_context)
    return CoremlInfo(
        deployment=dict(DEPLOYMENT), weights=weights, max_context=max_context,
        packages={"vision_encoder": {"path": PACKAGES["vision_encoder"], **vision_io_spec(model)},
                  "decoder": {"path": PACKAGES["decoder"], **dims.io_spec()}},
        compression=compression, embed_tokens=CoremlEmbeddings(**embed),
        causal_mask={"visible": 0.0, "hidden": MASK_MIN, "position": "P = last dim - T"},
        kv_cache={"layout": ["layer", "batch", "num_kv_heads", "max_context", "head_dim"],
                  "dtype": "float16", "states": [KEY_CACHE, VALUE_CACHE]},
        **facts)


def tolerances(weights: str) -> dict[str, float]:
    """Bounds on validate_predictions' relative errors (the vision encoder is int8 under int4)."""
    from .coreml_compress import package_modes

    modes = package_modes(weights)
    return {"image_features_rel_err": TOLERANCES[modes["vision_encoder"]],
            "logits_rel_err": TOLERANCES[modes["decoder"]]}


def _validation(model, root: Path, weights: str) -> dict:
    if not can_predict():
        return {"skipped": NO_PREDICT_REASON}
    result: dict[str, Any] = validate_predictions(model, root / PACKAGES["vision_encoder"], root / PACKAGES["decoder"])
    bounds = tolerances(weights)
    result["tolerances"] = bounds
    failed = {k: f"{result[k]:.4f} > {b}" for k, b in bounds.items() if result[k] > b}
    if failed:
        raise EdgeVLMError(f"Core ML outputs differ from PyTorch beyond the {weights} tolerances: {failed}")
    return result


def validate_predictions(model, vision_path: Path, decoder_path: Path, prompt_tokens: int = 5,
                         decode_steps: int = 3, seed: int = 0) -> dict[str, float]:
    """Run both packages (macOS) against PyTorch: image features, then logits of a prefill of
    [tokens, image, tokens] and ``decode_steps`` single-token steps vs one full PyTorch forward.
    Relative errors: max |coreml - torch| / max |torch|."""
    import coremltools as ct
    import numpy as np
    import torch

    from .coreml_decoder import causal_mask

    g = torch.Generator().manual_seed(seed)
    s = model.cfg.vision.image_size
    pixels = torch.randn(1, 3, s, s, generator=g)
    cu = ct.ComputeUnit.CPU_ONLY  # reproducible; GPU / Neural Engine numerics are checked on device
    vision = ct.models.MLModel(str(vision_path), compute_units=cu)
    decoder = ct.models.MLModel(str(decoder_path), compute_units=cu)
    with torch.no_grad():
        ref_feats = model.encode_images(pixels).float()  # [1, M, D]
        got_feats = vision.predict({PIXEL_VALUES: pixels.numpy().astype(np.float16)})[IMAGE_FEATURES]
        ids = torch.randint(0, model.cfg.llm.vocab_size, (1, prompt_tokens + decode_steps), generator=g)
        emb = model.llm.get_input_embeddings()(ids)  # [1, n, D]
        half = prompt_tokens // 2
        seq = torch.cat([emb[:, :half], ref_feats, emb[:, half:]], dim=1)  # [1, L, D]
        ref_logits = model.llm(inputs_embeds=seq).logits[0].float().numpy()  # [L, V]
    x = seq.numpy().astype(np.float16)
    state = decoder.make_state()
    prefill = x.shape[1] - decode_steps
    outs = [decoder.predict({INPUTS_EMBEDS: x[:, :prefill], CAUSAL_MASK: causal_mask(0, prefill)},
                            state=state)[LOGITS][0]]
    for p in range(prefill, x.shape[1]):
        outs.append(decoder.predict({INPUTS_EMBEDS: x[:, p : p + 1], CAUSAL_MASK: causal_mask(p, 1)},
                                    state=state)[LOGITS][0])
    got_logits = np.concatenate(outs, axis=0).astype(np.float32)

    def rel(a, b) -> float:
        return float(np.abs(np.asarray(a, np.float32) - b).max() / max(float(np.abs(b).max()), 1e-6))

    return {"image_features_rel_err": rel(got_feats, ref_feats.numpy()), "logits_rel_err": rel(got_logits, ref_logits),
            "argmax_agreement": float((got_logits.argmax(-1) == ref_logits.argmax(-1)).mean()),
            "compute_units": "CPU_ONLY", "positions": int(x.shape[1])}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from edgevlm.export.common import add_model_out_arguments

    add_model_out_arguments(p)
    p.add_argument("--weights", choices=WEIGHTS, default="fp16",
                   help="weight format: fp16, int8 (per channel) or int4 (blocks of 32; vision encoder int8) "
                        "(default: %(default)s)")
    p.add_argument("--max-context", type=int, default=None,
                   help="KV cache length in tokens, image tokens included (default: the model's "
                        "max_position_embeddings)")
    p.add_argument("--no-validate", action="store_true", help="skip the PyTorch comparison on macOS")
    p.add_argument("overrides", nargs="*", help="model config overrides for presets, e.g. llm.num_hidden_layers=2")


def run(args: argparse.Namespace) -> int:
    from .common import load_for_export, model_source

    model = load_for_export(args.model, args.overrides)
    source = model_source(args.model)
    out = export_coreml(model, args.out, args.weights, args.max_context, source=source,
                        validate=not args.no_validate)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({total / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    from edgevlm.cli import script_main

    script_main("export", "coreml")
