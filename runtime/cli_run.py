"""Answer a prompt about an image with an exported bundle (torch-free for ONNX, GGUF and TensorRT bundles).

Example:
    edgevlm run --bundle bundles/tiny-int4 --image photo.jpg --prompt "What colour is the car?" --stream

Constrained answers (docs/structured-output.md): --json-schema FILE | --json-object | --regex RE |
--choices yes,no; with --json, --logprobs N adds each token's logprob and N alternatives.

Prints the answer, then one line of timings (vision, prefill, time to first token, decode speed).
The bundle's manifest picks the backend (onnx: ort, gguf: llamacpp, trt: trt); --bundle may also be
a model dir or preset, run by the PyTorch reference (torch backend).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="bundle dir (manifest.json), or a model dir or preset (torch)")
    p.add_argument("--image", help="image file (omit for a text-only prompt)")
    p.add_argument("--prompt", required=True)
    add_runtime_arguments(p)
    add_generation_arguments(p)
    p.add_argument("--json", action="store_true", help="print the result (text, ids, timings) as one JSON line")


# flag -> Runtime.load option, for the flags that are given (None: the backend's default)
RUNTIME_FLAGS = {"threads": "threads", "verbose": "verbose", "max_context": "max_context", "quant": "quant",
                 "providers": "providers", "model_format": "model_format"}


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """Backend choice and runtime options shared by ``edgevlm run`` and ``edgevlm serve``."""
    p.add_argument("--backend", default=None,
                   help="default: the bundle's own (onnx: ort, gguf: llamacpp, trt: trt; model dir or preset: torch)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads, every backend (default/0: all cores)")
    p.add_argument("--verbose", action="store_true", default=None, help="the backend library's own log on stderr")
    p.add_argument("--max-context", type=int, default=None,
                   help="most positions per sequence: image + prompt + answer (default: the model's)")
    p.add_argument("--quant", default=None, help="llamacpp: which LLM of a GGUF bundle (default: the bundle's)")
    p.add_argument("--providers", default=None, help="ort: cpu | cuda | tensorrt (default: cpu)")
    p.add_argument("--model-format", choices=("onnx", "ort"), default=None,
                   help="ort: run the .onnx graphs (default) or the bundle's .ort files")


def runtime_options(args: argparse.Namespace) -> dict:
    """The ``Runtime.load`` options of the flags given; the backend refuses those it does not take."""
    return {opt: getattr(args, flag) for flag, opt in RUNTIME_FLAGS.items() if getattr(args, flag) is not None}


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    """Decoding flags shared by ``edgevlm run`` (bundles) and ``edgevlm ask`` (torch model)."""
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    g = p.add_mutually_exclusive_group()  # constrained decoding: docs/structured-output.md
    g.add_argument("--json-schema", metavar="FILE", help="answer as JSON valid under this JSON schema file")
    g.add_argument("--json-object", action="store_true", help="answer as one JSON object")
    g.add_argument("--regex", metavar="RE", help="answer fully matching this regular expression")
    g.add_argument("--choices", metavar="A,B,..", help="answer with exactly one of these comma-separated options")
    p.add_argument("--logprobs", type=int, metavar="N", default=None,
                   help="with --json: each token's logprob and its N (0..20) most likely alternatives")


def constraint_of(args: argparse.Namespace):
    """The Constraint named by the flags (None: free text); a bad file or schema is an EdgeVLMError."""
    from .constrain import constraint_from
    from .errors import ConstraintError

    schema = None
    if getattr(args, "json_schema", None):
        try:
            schema = Path(args.json_schema).read_text(encoding="utf-8")
        except OSError as e:
            raise ConstraintError(f"--json-schema: cannot read {args.json_schema} ({e.strerror})") from None
    choices = [c.strip() for c in args.choices.split(",")] if getattr(args, "choices", None) else None
    return constraint_from(schema, getattr(args, "json_object", False), getattr(args, "regex", None), choices)


def answer(target, args: argparse.Namespace, stream: bool):
    """Run ``target.generate``/``target.stream`` (a Runtime or a torch model) with the CLI's decoding
    flags, printing the text (piece by piece when streaming); returns the GenerationResult."""
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
               top_k=args.top_k, top_p=args.top_p, seed=args.seed, constraint=constraint_of(args))
    if getattr(args, "logprobs", None) is not None:
        gen.update(logprobs=True, top_logprobs=args.logprobs)
    if not stream:
        return target.generate(image=args.image, prompt=args.prompt, **gen)
    pieces = target.stream(image=args.image, prompt=args.prompt, **gen)
    for piece in pieces:
        print(piece, end="", flush=True)
    print()
    return pieces.result


def run(args: argparse.Namespace) -> int:
    from .engine import Runtime

    with Runtime.load(args.bundle, backend=args.backend, **runtime_options(args)) as rt:
        result = answer(rt, args, stream=args.stream and not args.json)
    if args.json:
        out = {"text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
               "timings": result.timings.to_dict()}
        if result.logprobs is not None:
            out["logprobs"] = [asdict(e) for e in result.logprobs]
        print(json.dumps(out))
        return 0
    if not args.stream:
        print(result.text)
    print(format_timings(result.timings.to_dict()), file=sys.stderr)
    return 0


def format_timings(t: dict) -> str:
    speed = "n/a" if t["decode_tok_s"] is None else f"{t['decode_tok_s']:.1f} tok/s"
    return (f"[vision {t['vision_ms']:.0f} ms | prefill {t['prefill_ms']:.0f} ms | ttft {t['ttft_ms']:.0f} ms | "
            f"decode {speed} | {t['n_visual_tokens']} visual + {t['n_prompt_tokens']} prompt tokens, "
            f"{t['n_generated']} generated]")


if __name__ == "__main__":
    from edgevlm.cli import script_main

    script_main("run")
