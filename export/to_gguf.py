"""Export a model to a GGUF bundle for llama.cpp: LLM files per quant type plus an f16 mmproj.

Example: python export/to_gguf.py --model runs/tiny/final --out bundles/tiny-gguf --quant f16 q4_k_m

The bundle holds llm-<quant>.gguf for each --quant (llama architecture, the model's own
SentencePiece tokenizer and chat template; quantised by llama.cpp's quantiser from the f16 file),
mmproj-f16.gguf (CLIP vision tower + integrator, clip architecture), the tokenizer and a README.md
with the commands; run it with ``Runtime.load(bundle, backend="llamacpp", quant=...)``, llama-mtmd-cli
or llama-server (``export/gguf_usage.py``; the manifest's ``target_info.llama_cpp_usage``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from edgevlm.export.token_check import PROMPTS, check_prompt_count
from edgevlm.export.token_check import add_argument as add_token_check_argument

DEFAULT_QUANTS = ("q4_k_m", "f16")  # the first is the bundle's default_quant


def add_arguments(p: argparse.ArgumentParser) -> None:
    from edgevlm.export.common import add_model_out_arguments

    add_model_out_arguments(p)
    p.add_argument("--quant", nargs="+", default=list(DEFAULT_QUANTS),
                   help="LLM quant types: f16 q8_0 q5_k_m q4_k_m q4_0 (default: %(default)s)")
    p.add_argument("--cls", choices=("omit", "keep"), default="omit",
                   help="CLIP's class embedding in the mmproj: omit (llama.cpp then runs the patches "
                        "alone; its llava graph misplaces CLS, see export/gguf_mmproj.py) or keep "
                        "(for a llama.cpp with that fixed) (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="quantiser threads (0: all cores)")
    add_token_check_argument(p, per="each quant type")


def export_gguf(model, out, quants=DEFAULT_QUANTS, cls: str = "omit", threads: int = 0,
                source: str | None = None, progress: bool = True, token_check: int = PROMPTS) -> Path:
    """Write the GGUF bundle for ``model`` (an EdgeVLM) to ``out``; returns its path. ``token_check``:
    how many held-out prompts each quant type answers beside PyTorch (0: skip)."""
    from edgevlm.export.common import base_manifest, copy_tokenizer, require_exportable
    from edgevlm.export.gguf_llm import write_llm
    from edgevlm.runtime.chat import get_template
    from edgevlm.export.gguf_mmproj import projector_type, write_mmproj
    from edgevlm.export.gguf_quant import check_quant_types, llama_cpp_versions, quantize, tensor_types
    from edgevlm.export.gguf_usage import llama_cpp_usage, readme
    from edgevlm.runtime.backends.llamacpp import quiet_llama_logs
    from edgevlm.runtime.gguf_check import check_pair
    from edgevlm.runtime.manifest import BundleWriter, FileEntry
    from edgevlm.runtime.target_info import GgufInfo, LlamaCppUsage

    quants = check_quant_types(quants)
    require_exportable(model, "gguf")  # refuse unsupported integrators before writing anything
    projector_type(model)
    quiet_llama_logs()
    with BundleWriter(out) as w:
        steps = _progress(["llm f16", *[f"quantise {q}" for q in quants if q != "f16"], "mmproj"], progress)
        base = w.path("llm-f16.gguf")
        next(steps)
        llm_info = write_llm(model, base)
        llm_files = {}
        for q in quants:
            if q != "f16":
                next(steps)
                quantize(base, w.path(f"llm-{q}.gguf"), q, threads)
            llm_files[q] = f"llm-{q}.gguf"
        if "f16" not in quants:
            base.unlink()
        next(steps)
        mm_info = write_mmproj(model, w.path("mmproj-f16.gguf"), cls=cls)
        next(steps, None)
        for rel in llm_files.values():
            check_pair(w.path(rel), w.path("mmproj-f16.gguf"))  # what the backend checks on load
        files = [FileEntry(rel, "llm") for rel in llm_files.values()]
        files += [FileEntry("mmproj-f16.gguf", "mmproj"), *copy_tokenizer(model, w), FileEntry("README.md", "readme")]
        template = get_template(model.cfg.chat_template)
        w.path("README.md").write_text(readme(template, llm_files, "mmproj-f16.gguf"))
        info = GgufInfo(quant_types=list(quants), default_quant=quants[0], llm=llm_files, mmproj="mmproj-f16.gguf",
                        mmproj_type="f16", projector_type=mm_info["projector_type"],
                        vision_layers=mm_info["vision_layers"], cls=mm_info["cls"], mmproj_tensors=mm_info["n_tensors"],
                        mm_embd=mm_info["mm_embd"], llm_tensors=llm_info["n_tensors"],
                        tensor_types={q: tensor_types(w.path(rel)) for q, rel in llm_files.items()},
                        llama_cpp=llama_cpp_versions(),
                        llama_cpp_usage=LlamaCppUsage(**llama_cpp_usage(template, llm_files[quants[0]],
                                                                        "mmproj-f16.gguf")),
                        source=source or "")
        manifest = base_manifest(model, "gguf", files, "edgevlm.export.to_gguf",
                                 libraries=("gguf", "llama_cpp_python"), target_info=info)
        if token_check:
            from .token_check import check_tokens

            info.token_check = {q: check_tokens(model, w.dir, manifest, token_check, backend="llamacpp", quant=q,
                                                threads=1) for q in quants}
        return w.commit(manifest)


def _progress(names: list[str], enabled: bool):
    from tqdm.auto import tqdm

    bar = tqdm(total=len(names), desc="gguf", disable=not enabled)
    for name in names:
        bar.set_postfix_str(name)
        yield name
        bar.update(1)
    bar.close()


def run(args: argparse.Namespace) -> int:
    from edgevlm.export.common import load_for_export
    from edgevlm.export.gguf_quant import check_quant_types
    from edgevlm.runtime.manifest import read_manifest

    check_quant_types(args.quant)  # before the (slow) model load
    check_prompt_count(args.token_check)
    model = load_for_export(args.model)
    source = str(Path(args.model).resolve()) if Path(args.model).is_dir() else args.model
    out = export_gguf(model, args.out, args.quant, cls=args.cls, threads=args.threads, source=source,
                      token_check=args.token_check)
    m = read_manifest(out, verify=False)
    info = m.target_info
    print(f"wrote {out} ({info.projector_type} projector, {info.vision_layers} ViT layers)")
    for f in m.files:
        if f.role in ("llm", "mmproj"):
            print(f"  {f.path:<22} {f.size / 2**20:8.1f} MiB")
    for q, types in info.tensor_types.items():
        print(f"  {q:<8} tensor types: {', '.join(f'{k} x{v}' for k, v in types.items())}")
        if (tc := info.token_check.get(q)) is not None:
            print(f"  {q:<8} vs PyTorch: same top token {tc.same_top_token:.1%}, mean KL {tc.kl_mean:.2g}")
    return 0


if __name__ == "__main__":
    from edgevlm.cli import script_main

    script_main("export", "gguf")
