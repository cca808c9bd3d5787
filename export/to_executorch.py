"""ExecuTorch bundle: one ``.pte`` for ExecuTorch's multimodal runner, plus the tokenizer it loads.

Example:
    python export/to_executorch.py --model runs/tiny/final --out bundles/tiny-et --quantize 8da4w

The ``.pte`` holds the methods ``vision_encoder`` (tower + integrator), ``token_embedding`` and
``text_decoder`` (static KV cache of ``--max-seq-len`` positions) and the constant methods the runner
reads (export/executorch_lower.py). --quantize 8da4w / int8 quantises the decoder's linears with
torchao; XNNPACK runs what it supports. Each method is checked against PyTorch in ExecuTorch
(export/executorch_validate.py), then held-out ShapesVQA prompts are answered by the bundle beside
PyTorch (KL and same-top-token in the manifest; fp32 must match). The bundle appears only when
complete. ``edgevlm run --bundle B`` answers from it (the ``executorch`` backend); docs/executorch.md
shows how an Android or iOS app runs it with ExecuTorch's C++ runner.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from edgevlm.runtime.errors import EdgeVLMError

from edgevlm.export.executorch_options import GROUP_SIZE, QUANTIZE, check_quantize
from edgevlm.export.onnx_checks import VALIDATE, validate_mode, warn_failed_checks
from edgevlm.export.token_check import PROMPTS, check_prompt_count
from edgevlm.export.token_check import add_argument as add_token_check_argument

PTE = "model.pte"
TOKEN_ATOL = {"fp32": 1e-3}  # logit parity the token check enforces; quantised variants are reported
DEFAULT_MAX_SEQ_LEN = 1024


def max_seq_len_for(model, max_seq_len: int | None) -> int:
    """The static KV cache's positions: ``max_seq_len`` (default min(1024, the model's)), checked."""
    limit = model.cfg.llm.max_position_embeddings
    n = min(DEFAULT_MAX_SEQ_LEN, limit) if max_seq_len is None else max_seq_len
    if not model.n_visual_tokens + 8 <= n <= limit:
        raise EdgeVLMError(f"--max-seq-len must hold the {model.n_visual_tokens} visual tokens and a prompt "
                           f"({model.n_visual_tokens + 8}..{limit} for this model), got {n}")
    return n


def method_layouts(model, max_seq_len: int) -> dict[str, dict]:
    """The methods' inputs and outputs as the manifest records them (dims: str symbolic, int fixed)."""
    c = model.cfg
    s, d, v = c.vision.image_size, c.llm.hidden_size, c.llm.vocab_size
    return {"vision_encoder": {"inputs": {"pixel_values": ["float32", 1, 3, s, s]},
                               "outputs": {"image_features": ["float32", 1, model.n_visual_tokens, d]}},
            "token_embedding": {"inputs": {"input_ids": ["int64", 1, "seq"]},
                                "outputs": {"embeddings": ["float32", 1, "seq", d]}},
            "text_decoder": {"inputs": {"embeddings": ["float32", 1, "seq", d], "input_pos": ["int64", 1]},
                             "outputs": {"logits": ["float32", 1, v]}, "seq_max": max_seq_len}}


def runner_tokenizer(files: list[str]) -> str:
    """The tokenizer file to hand ExecuTorch's runner. Its loader (pytorch-tokenizers) tries HF
    ``tokenizer.json`` first, but (1.5.0) rejects the Metaspace pre-tokenizer of LLaMA-family
    tokenizers; it then reads SentencePiece's ``tokenizer.model``, which those tokenizers ship."""
    if "tokenizer.model" in files:
        return "tokenizer.model"
    if "tokenizer.json" in files:
        return "tokenizer.json"
    raise EdgeVLMError("the model has neither tokenizer.model nor tokenizer.json for ExecuTorch's runner")


def _info(model, quantize: str, facts: dict, lowering: dict, report: dict, max_seq_len: int, tokenizer: str,
          **extra):
    import importlib.metadata

    from edgevlm.runtime.target_info import ExecutorchInfo, KvCache

    from .executorch_lower import constant_methods

    c = model.cfg.llm
    kv = KvCache(layout=["batch", "num_kv_heads", "max_seq_len", "head_dim"], num_layers=c.num_hidden_layers,
                 in_place=True, dtype="float32")
    return ExecutorchInfo(pte=PTE, tokenizer=tokenizer, quantize=quantize, quantization=facts,
                          max_seq_len=max_seq_len, methods=method_layouts(model, max_seq_len),
                          constant_methods=constant_methods(model, max_seq_len), kv_cache=kv,
                          executorch=importlib.metadata.version("executorch"), validation=report,
                          lowering=lowering, **extra)


def export_executorch(model, out: str | Path, quantize: str = "8da4w", max_seq_len: int | None = None,
                      group_size: int = GROUP_SIZE, source: str | None = None, token_check: int = PROMPTS,
                      validate: str = "strict") -> Path:
    """Write an ExecuTorch bundle of ``model`` to ``out`` (see the module docstring)."""
    from edgevlm.runtime.manifest import BundleWriter, FileEntry

    from .common import base_manifest, copy_tokenizer, require_exportable
    from .executorch_lower import build_modules, lower_to_pte
    from .executorch_validate import damage_report, validate_pte

    require_exportable(model, "executorch")
    check_quantize(quantize, group_size)
    judge = validate_mode(validate) == "strict"
    n = max_seq_len_for(model, max_seq_len)
    t0 = time.perf_counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with BundleWriter(out) as writer:
        modules, facts = build_modules(model, n, quantize, group_size)
        pte, lowering = lower_to_pte(model, modules, n)
        writer.path(PTE).write_bytes(pte)
        del pte
        report = validate_pte(writer.path(PTE), model, modules, quantize, n, judge)
        del modules
        files = [FileEntry(PTE, "pte"), *copy_tokenizer(model, writer)]
        info = _info(model, quantize, facts, lowering, report, n, runner_tokenizer([f.path for f in files]),
                     source=source or "",
                     export_s=round(time.perf_counter() - t0, 1), validate=validate,
                     failed_checks=damage_report(report))
        manifest = base_manifest(model, "executorch", files, "edgevlm.export.to_executorch",
                                 ("executorch", "torchao"), info)
        if token_check:
            _token_check(model, writer, manifest, token_check, TOKEN_ATOL.get(quantize), judge)
        return writer.commit(manifest)


def _token_check(model, writer, manifest, prompts: int, atol: float | None, judge: bool) -> None:
    from .token_check import check_tokens

    info = manifest.target_info
    try:
        info.token_check = check_tokens(model, writer.dir, manifest, prompts, atol, backend="executorch", threads=1)
    except EdgeVLMError as e:
        if judge:
            raise
        info.failed_checks.append(str(e))


def add_arguments(p: argparse.ArgumentParser) -> None:
    from edgevlm.export.common import add_model_out_arguments

    add_model_out_arguments(p)
    p.add_argument("--quantize", choices=QUANTIZE, default="8da4w",
                   help="text decoder linears: fp32, 8da4w (int8 dynamic activations, int4 grouped weights; "
                        "the default) or int8 (int8 dynamic activations, int8 per-channel weights)")
    p.add_argument("--group-size", type=int, default=GROUP_SIZE, help="8da4w weight group (default: %(default)s)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help=f"positions of the static KV cache: visual + prompt + generated tokens "
                        f"(default: min({DEFAULT_MAX_SEQ_LEN}, the model's))")
    add_token_check_argument(p)
    p.add_argument("--validate", choices=VALIDATE, default="strict",
                   help="strict (default): a failed check against PyTorch fails the export; warn: write the "
                        "bundle anyway, with every failed check listed in its manifest (failed_checks)")
    p.add_argument("overrides", nargs="*", help="model config overrides for presets, e.g. llm.num_hidden_layers=2")


def run(args: argparse.Namespace) -> int:
    from .common import load_for_export, model_source

    check_quantize(args.quantize, args.group_size)
    check_prompt_count(args.token_check)
    try:
        import executorch  # noqa: F401
    except ImportError:
        raise EdgeVLMError("the executorch export needs ExecuTorch: pip install 'edgevlm[executorch]'") from None
    model = load_for_export(args.model, args.overrides)
    out = export_executorch(model, args.out, args.quantize, args.max_seq_len, args.group_size,
                            source=model_source(args.model), token_check=args.token_check, validate=args.validate)
    print(f"wrote {out} ({(out / PTE).stat().st_size / 1e6:.1f} MB .pte)")
    warn_failed_checks(out)
    return 0


if __name__ == "__main__":
    from edgevlm.cli import script_main

    script_main("export", "executorch")
