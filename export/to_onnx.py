"""ONNX bundle: vision_encoder / embed_tokens / decoder_model_merged graphs for ONNX Runtime.

Example:
    python export/to_onnx.py --model runs/tiny/final --out bundles/tiny-int4 --quantize int4 \\
        --calib-data data/shapes

--dtype fp16 converts every graph to fp16 (for GPUs and mobile accelerators). --quantize int8:
dynamic int8 decoder MatMuls + static QDQ int8 vision graph calibrated on --calib-data images;
int4: MatMulNBits decoder (block 32, accuracy level 4) + the int8 vision graph. Quantised bundles
use ONNX Runtime's GroupQueryAttention decoder with an in-place KV cache (--attention gqa; fp32/fp16
keep the standard, portable graph unless asked). --ort-format also writes .ort files and the
reduced-operator config for ONNX Runtime Mobile. Every graph passes onnx.checker and is checked
against PyTorch; the bundle appears only when complete.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from edgevlm.runtime.errors import EdgeVLMError

from edgevlm.export.onnx_checks import VALIDATE, check_tokens_recorded, failures_of, validate_mode, warn_failed_checks
from edgevlm.export.token_check import PROMPTS, check_prompt_count
from edgevlm.export.token_check import add_argument as add_token_check_argument

DTYPES = ("fp32", "fp16")
QUANTIZE = ("none", "int8", "int4")
ATTENTION = ("auto", "standard", "gqa")
GRAPHS = ("vision_encoder", "embed_tokens", "decoder")
INT8_TARGETS = ("portable", "reduce-range", "vnni")  # the keys of onnx_quant.INT8_FORMATS
TOKEN_ATOL = {"fp32": 1e-3}  # logit parity the token check enforces; other variants are reported


def variant_plan(dtype: str, quantize: str) -> dict[str, str]:
    """graph -> variant: fp32 | fp16 | int8_static | int8_dynamic | int4."""
    if dtype not in DTYPES or quantize not in QUANTIZE:
        raise EdgeVLMError(f"dtype must be one of {DTYPES} and quantize one of {QUANTIZE}")
    if dtype == "fp16" and quantize != "none":
        raise EdgeVLMError("--dtype fp16 cannot be combined with --quantize (quantised graphs keep fp32 "
                           "activations); pick one")
    if dtype == "fp16":
        return dict.fromkeys(GRAPHS, "fp16")
    if quantize == "none":
        return dict.fromkeys(GRAPHS, "fp32")
    return {"vision_encoder": "int8_static", "embed_tokens": "fp32",
            "decoder": "int8_dynamic" if quantize == "int8" else "int4"}


def int8_format(target: str):
    """The ``onnx_quant.Int8Format`` named ``target`` (``--int8-target``)."""
    if target not in INT8_TARGETS:
        raise EdgeVLMError(f"--int8-target must be one of {', '.join(INT8_TARGETS)}, got {target!r}")
    from .onnx_quant import INT8_FORMATS

    return INT8_FORMATS[target]


def _advice(variant: str, int8) -> str:
    """What to try when a variant fails validation (appended to the error)."""
    if variant.startswith("int8") and int8.name == "vnni":
        from edgevlm.runtime.hostcpu import u8s8_saturates

        if u8s8_saturates():
            return ("--int8-target vnni is only accurate on CPUs with VNNI (and on Arm); this CPU lacks it: "
                    "use --int8-target portable (the default) or reduce-range")
        return ("this CPU has VNNI, so u8 x s8 saturation is not the cause: use --int8-target portable "
                "(the default) or --quantize int4")
    if variant.startswith("int8"):
        return "try --int8-target portable (u8 x u8, the most accurate int8 format) or --quantize int4 / --dtype fp16"
    if variant == "int4":
        return ("the int4 kernels differ from the same weights in fp32 on this CPU: try --quantize int8 "
                "or --dtype fp16")
    return "this is an exporter bug for fp32/fp16 graphs: please report it with the manifest's versions"


def decoder_attention(dtype: str, quantize: str, attention: str = "auto") -> str:
    """``standard`` (plain ONNX ops: any runtime, TensorRT included) or ``gqa`` (ONNX Runtime's
    GroupQueryAttention, in-place KV cache). auto: gqa for the quantised, ONNX-Runtime-only bundles."""
    if attention not in ATTENTION:
        raise EdgeVLMError(f"attention must be one of {ATTENTION}, got {attention!r}")
    if attention == "auto":
        return "gqa" if quantize != "none" else "standard"
    if attention == "gqa" and dtype == "fp16":
        raise EdgeVLMError("--attention gqa is for fp32/int8/int4 decoders; fp16 bundles use the standard graph")
    return attention


def calibration_pixels(model, calib_data: str | None, count: int) -> tuple[list, dict]:
    """Preprocessed images for static quantisation: a folder of images, a LLaVA JSON, or (no
    path) freshly drawn ShapesVQA scenes. Returns (pixel arrays [1, 3, S, S], description)."""
    from edgevlm.runtime.preprocess import load_image, preprocess_image

    cfg = model.cfg.preprocess
    if calib_data is None:
        from edgevlm.train.data.shapes import make_item, render_scene

        images = [render_scene(make_item(1234, "train", i)[0]) for i in range(count)]
        return [preprocess_image(im, cfg) for im in images], {"source": "ShapesVQA (generated, seed 1234)",
                                                              "n_images": count}
    path = Path(calib_data)
    if path.is_file() and path.suffix == ".json":
        from edgevlm.train.data.llava import load_llava_records

        files = [r.image_path for r in load_llava_records(str(path)).records if r.image_path][:count]
    elif path.is_dir():
        exts = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in exts)[:count]
    else:
        raise EdgeVLMError(f"--calib-data {calib_data}: not a folder of images or a LLaVA .json file")
    if not files:
        raise EdgeVLMError(f"--calib-data {calib_data}: no images found")
    return [preprocess_image(load_image(f), cfg) for f in files], {"source": str(path), "n_images": len(files)}


def _make_variant(variant: str, src: Path, dst: Path, pixels: Sequence | None, int8) -> list[Path]:
    from . import onnx_quant as q
    from .onnx_io import copy_graph

    if variant == "fp32":
        return copy_graph(src, dst)
    if variant == "fp16":
        return q.to_fp16(src, dst)
    if variant == "int8_static":
        return q.quantize_int8_static(src, dst, pixels or [], int8)
    if variant == "int8_dynamic":
        return q.quantize_int8_dynamic(src, dst, int8)
    return q.quantize_int4(src, dst)


def export_fp32_graphs(model, work_dir: Path, exporter: str = "dynamo", opset: int | None = None,
                       graphs: Sequence[str] = GRAPHS, judge: bool = True) -> dict[str, dict]:
    """Export and validate the fp32 graphs (the source of every variant); without ``judge`` a
    failed check is listed in ``validation_fp32['failures']`` instead of raised."""
    from .onnx_graphs import OPSET, export_graphs
    from .onnx_io import release_memory
    from .onnx_validate import validate_graph

    graphs = export_graphs(model, work_dir, exporter, opset or OPSET, tuple(graphs))
    for name, info in graphs.items():
        info["validation_fp32"] = validate_graph(model, name, info["path"], "fp32", judge=judge)
        release_memory()
    return graphs


def _gqa_source(model, fp32_graphs: dict, opset: int | None, judge: bool = True) -> dict:
    """The fp32 GQA decoder beside the exported graphs (built and validated once, then cached in
    ``fp32_graphs``)."""
    from .onnx_graphs import OPSET, build_gqa_decoder
    from .onnx_validate import validate_graph

    if "decoder_gqa" not in fp32_graphs:
        folder = Path(fp32_graphs["vision_encoder"]["path"]).parent / "gqa"
        folder.mkdir(exist_ok=True)
        path = folder / "decoder_model_merged.onnx"
        info = {"path": path, **build_gqa_decoder(model, path, opset or OPSET)}
        info["validation_fp32"] = validate_graph(model, "decoder", path, "fp32", gqa=True, judge=judge)
        fp32_graphs["decoder_gqa"] = info
    return fp32_graphs["decoder_gqa"]


def export_onnx(model, out: str | Path, dtype: str = "fp32", quantize: str = "none", exporter: str = "dynamo",
                opset: int | None = None, ort_format: bool = False, calib_data: str | None = None,
                calib_count: int = 32, source: str | None = None, fp32_graphs: dict | None = None,
                progress: bool = True, attention: str = "auto", int8_target: str = "portable",
                token_check: int = PROMPTS, validate: str = "strict") -> Path:
    """Write an ONNX bundle to ``out``. ``fp32_graphs`` (from ``export_fp32_graphs``) lets several
    variants share one export; ``attention`` picks the decoder graph (see ``decoder_attention``);
    ``int8_target`` the int8 format (``onnx_quant.INT8_FORMATS``); ``token_check`` how many
    held-out prompts the finished bundle answers beside PyTorch (0: skip); ``validate``: "strict"
    fails the export on the first failed check, "warn" writes the bundle anyway and lists every
    failed check in its manifest (``failed_checks``) and on stderr."""
    from tqdm.auto import tqdm

    from .common import require_exportable

    require_exportable(model, "onnx")

    from edgevlm.runtime.manifest import BundleWriter

    from .common import base_manifest, copy_tokenizer

    plan = variant_plan(dtype, quantize)
    judge = validate_mode(validate) == "strict"  # warn: failed checks are listed, not raised
    attn = decoder_attention(dtype, quantize, attention)
    int8 = int8_format(int8_target) if quantize != "none" else None
    t0 = time.perf_counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=2 + len(GRAPHS) + ort_format, desc="onnx export", disable=not progress)
    with tempfile.TemporaryDirectory(prefix=".onnx-work-", dir=out.parent) as tmp, BundleWriter(out) as writer:
        if fp32_graphs is None:  # the traced decoder is not needed when the GQA one is built instead
            bar.set_postfix_str("export + validate fp32 graphs")
            fp32_graphs = export_fp32_graphs(model, Path(tmp), exporter, opset,
                                             GRAPHS if attn == "standard" else GRAPHS[:2], judge)
        bar.update(1)
        sources = {g: fp32_graphs[g] for g in GRAPHS[:2]}
        sources["decoder"] = _gqa_source(model, fp32_graphs, opset, judge) if attn == "gqa" else fp32_graphs["decoder"]
        calib = calibration = None
        if "int8_static" in plan.values():
            calib, calibration = _calibration_split(model, calib_data, calib_count)
        graphs, files = _write_variants(model, plan, sources, writer, calib, bar, attn, int8, judge)
        ort, ort_files = _write_ort(model, writer, bar) if ort_format else (None, [])
        files += ort_files + copy_tokenizer(model, writer)
        info = _onnx_info(model, plan, attn, int8, opset=opset, dtype=dtype, quantize=quantize, graphs=graphs,
                          exporter=fp32_graphs["vision_encoder"]["exporter"], calibration=calibration,
                          decoder_exporter=sources["decoder"]["exporter"], ort_format=ort, source=source or "",
                          export_s=round(time.perf_counter() - t0, 1), validate=validate)
        manifest = base_manifest(model, "onnx", files, "edgevlm.export.to_onnx", ("onnx", "onnxruntime", "onnxscript"),
                                 info)
        info.failed_checks = [f for g in (*sources.values(), *graphs.values()) for f in failures_of(g)]
        if token_check:
            bar.set_postfix_str("token check")
            check_tokens_recorded(model, writer, manifest, token_check, TOKEN_ATOL.get(dtype) if quantize == "none" else None,
                          judge)
        path = writer.commit(manifest)
        bar.update(1)
    bar.close()
    return path


def _calibration_split(model, calib_data: str | None, count: int) -> tuple[tuple[list, list], Any]:
    """(calibration images, 2 held-out images for validation) and the calibration description."""
    from edgevlm.runtime.target_info import Calibration

    pixels, desc = calibration_pixels(model, calib_data, count + 2)
    calib, held_out = (pixels[:count], pixels[count:]) if len(pixels) > count else (pixels, pixels[-2:])
    return (calib, held_out), Calibration(desc["source"], len(calib), "MinMax", len(held_out))


def _write_variants(model, plan: dict, sources: dict, writer, calib, bar, attn: str, int8,
                    judge: bool = True) -> tuple[dict, list]:
    """Each graph in its variant, validated against PyTorch; returns ({graph: OnnxGraph}, file entries)."""
    from edgevlm.runtime.manifest import FileEntry
    from edgevlm.runtime.target_info import OnnxGraph

    from .onnx_graphs import graph_specs
    from .onnx_quant_check import validate_quantized_decoder
    from .onnx_io import release_memory
    from .onnx_validate import image_cases, validate_graph

    specs = graph_specs(model)
    files, graphs = [], {}
    for graph, variant in plan.items():
        bar.set_postfix_str(f"{graph}: {variant}")
        pixels = calib[0] if calib else None
        written = _make_variant(variant, sources[graph]["path"], writer.path(specs[graph].file), pixels, int8)
        files += [FileEntry(p.name, graph if i == 0 else f"{graph}_data") for i, p in enumerate(written)]
        cases = image_cases(calib[1]) if variant == "int8_static" else None  # calibrated: real images only
        gqa = graph == "decoder" and attn == "gqa"
        if variant in ("int4", "int8_dynamic"):  # the decoder: format and kernels told apart
            report = validate_quantized_decoder(model, written[0], Path(sources[graph]["path"]),
                                                _tolerance_key(variant), gqa, _advice(variant, int8), judge)
        else:
            report = validate_graph(model, graph, written[0], _tolerance_key(variant), cases, gqa=gqa,
                                    advice=_advice(variant, int8), judge=judge)
        release_memory()  # the quantiser's and the validation's copies of a multi-GB graph
        graphs[graph] = OnnxGraph(**specs[graph].to_dict(), variant=variant, validation=report,
                                  attention=attn if graph == "decoder" else "")
        bar.update(1)
    return graphs, files


def _write_ort(model, writer, bar) -> tuple[Any, list]:
    """The .ort files and their reduced-operator config: (OrtFormat, file entries)."""
    from edgevlm.runtime.manifest import FileEntry
    from edgevlm.runtime.target_info import OrtFormat

    from .onnx_graphs import graph_specs
    from .onnx_quant import ORT_CONFIG, to_ort_format

    bar.set_postfix_str("convert to .ort")
    specs = graph_specs(model)
    written = to_ort_format([writer.path(specs[g].file) for g in GRAPHS], writer.dir, target_platform="arm")
    bar.update(1)
    return (OrtFormat("arm", "Fixed", ORT_CONFIG),
            [FileEntry(p.name, "ort_config" if p.name == ORT_CONFIG else f"{_graph_of(p, specs)}_ort")
             for p in written])


def _onnx_info(model, plan: dict, attn: str, int8, opset: int | None, **facts: Any):
    """The manifest's ``OnnxInfo``: ``facts`` plus the decoder's KV cache (in place for the GQA
    graph), the int8/int4 formats and the integrator's TensorRT refusal (to_trt.py runs on boards
    without torch: it reads the refusal from here)."""
    from edgevlm.model.integrators import export_refusal
    from edgevlm.runtime.target_info import Int4Info, Int8Info, KvCache, OnnxInfo

    from .onnx_graphs import OPSET
    from .onnx_quant import INT4_ACCURACY_LEVEL, INT4_BLOCK_SIZE

    c = model.cfg.llm
    kv = KvCache(layout=["batch", "num_kv_heads", "sequence", "head_dim"], num_layers=c.num_hidden_layers,
                 in_place=attn == "gqa", dtype="float16" if facts["dtype"] == "fp16" else "float32")
    int4 = (Int4Info(INT4_BLOCK_SIZE, INT4_ACCURACY_LEVEL, True, "com.microsoft.MatMulNBits")
            if plan["decoder"] == "int4" else None)
    return OnnxInfo(opset=opset or OPSET, kv_cache=kv, int4=int4, int8=Int8Info(**int8.to_dict()) if int8 else None,
                    trt_refusal=export_refusal(model.cfg.integrator.name, "trt") or "", **facts)


def _tolerance_key(variant: str) -> str:
    return {"int8_static": "int8", "int8_dynamic": "int8"}.get(variant, variant)


def _graph_of(path: Path, specs: dict) -> str:
    stem = path.name.removesuffix(".ort")
    return next(g for g, s in specs.items() if s.file.removesuffix(".onnx") == stem)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from edgevlm.export.common import add_model_out_arguments

    add_model_out_arguments(p)
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--quantize", choices=QUANTIZE, default="none")
    p.add_argument("--ort-format", action="store_true", help="also write .ort files for ONNX Runtime Mobile")
    p.add_argument("--calib-data", help="images for static int8 calibration: a folder or a LLaVA .json "
                                        "(default: freshly generated ShapesVQA scenes)")
    p.add_argument("--calib-count", type=int, default=32, help="calibration images (default: %(default)s)")
    p.add_argument("--int8-target", default="portable", choices=INT8_TARGETS,
                   help="int8 format for --quantize int8/int4: portable (u8 x u8, accurate on every CPU, the "
                        "default), reduce-range (u8 x 7-bit s8, every CPU, faster on AVX2), vnni (u8 x s8, "
                        "fastest, accurate only on x86 CPUs with VNNI and on Arm)")
    add_token_check_argument(p)
    p.add_argument("--validate", choices=VALIDATE, default="strict",
                   help="strict (default): a failed check against PyTorch fails the export; warn: write the "
                        "bundle anyway, with every failed check listed in its manifest (failed_checks)")
    p.add_argument("--attention", choices=ATTENTION, default="auto",
                   help="decoder attention graph: standard ONNX ops (any runtime) or ONNX Runtime's "
                        "GroupQueryAttention with an in-place KV cache (default auto: gqa when quantised)")
    p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                   help="torch.onnx exporter (default: %(default)s)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 18; >= 17)")
    p.add_argument("overrides", nargs="*", help="model config overrides for presets, e.g. llm.num_hidden_layers=2")


def run(args: argparse.Namespace) -> int:
    from .common import load_for_export, model_source

    if args.opset is not None and args.opset < 17:
        raise EdgeVLMError(f"--opset must be >= 17, got {args.opset}")
    variant_plan(args.dtype, args.quantize)  # bad combinations fail before the model loads
    decoder_attention(args.dtype, args.quantize, args.attention)
    if args.calib_count < 1:
        raise EdgeVLMError(f"--calib-count must be >= 1, got {args.calib_count}")
    check_prompt_count(args.token_check)
    model = load_for_export(args.model, args.overrides)
    source = model_source(args.model)
    out = export_onnx(model, args.out, args.dtype, args.quantize, args.exporter, args.opset, args.ort_format,
                      args.calib_data, args.calib_count, source=source, attention=args.attention,
                      int8_target=args.int8_target, token_check=args.token_check, validate=args.validate)
    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out} ({total / 1e6:.1f} MB)")
    warn_failed_checks(out)
    return 0


if __name__ == "__main__":
    from edgevlm.cli import script_main

    script_main("export", "onnx")
