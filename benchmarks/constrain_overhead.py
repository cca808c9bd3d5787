"""Per-token cost of constrained decoding (runtime.constrain) at MobileVLM-1.7B shape (32k Llama-style
vocabulary), against a measured decode step of a 1.7B bundle.

    python benchmarks/constrain_overhead.py --bundle BUNDLE_1.7B --llama-vocab-gguf ggml-vocab-llama-spm.gguf \
        --out benchmarks/results/constrain_overhead/x.jsonl

The vocabulary: ``--llama-vocab-gguf`` takes llama.cpp's ``models/ggml-vocab-llama-spm.gguf`` (Llama's own
32,000-token SentencePiece vocabulary, MobileVLM's; it ships in llama-cpp-python's source distribution),
converted once by transformers into a tokenizer.json and cached. Without it, the bundle's tokenizer: the
random 1.7B preset's is a 1k-token BPE padded with 31k added tokens, which the mask never has to walk.

Part 1 (every constraint kind): the loop's own pieces on seeded random logits [32000] -- ``adjust``,
``mask``, ``pick``, ``advance`` -- timed per token; the constraint's share is ``mask + advance`` (the
grammar engine's bitmask, unpacking it and -inf on the logits, and consuming the token). Compile times
(cold: the tokenizer's llguidance view and the matcher; cached: the LRU hit) are recorded too.
Part 2 (``--bundle``): the same bundle decodes ``--decode-tokens`` tokens unconstrained (ignore_eos)
and under the JSON schema; the overhead is part 1's per-token cost over the unconstrained decode step.
One JSONL row per constraint kind plus one ``decode`` row.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from edgevlm.benchmarks.environment import cpu_model, git_state, library_versions
from edgevlm.runtime.constrain import Constraint, _engine
from edgevlm.runtime.hostcpu import cpu_class
from edgevlm.runtime.sampling import Sampler, SamplingConfig
from edgevlm.runtime.tokenizer import TextTokenizer

SCHEMA = {  # the kind of answer a robot asks for: counts, a class, a box list, a short label
    "type": "object",
    "properties": {
        "present": {"type": "boolean"},
        "count": {"type": "integer", "minimum": 0, "maximum": 100},
        "colour": {"enum": ["red", "green", "blue", "yellow", "other"]},
        "label": {"type": "string", "maxLength": 24},
        "boxes": {"type": "array", "maxItems": 4, "items": {
            "type": "object", "properties": {k: {"type": "number"} for k in ("x", "y", "w", "h")},
            "required": ["x", "y", "w", "h"], "additionalProperties": False}},
    },
    "required": ["present", "count", "colour", "label", "boxes"],
    "additionalProperties": False,
}
KINDS = {
    "json_schema": lambda: Constraint.json_schema(SCHEMA),
    "json_object": Constraint.json_object,
    "regex": lambda: Constraint.regex(r"(yes|no), [0-9]{1,3} (red|green|blue)"),
    "choices": lambda: Constraint.choices(["yes", "no"]),
}


def time_kind(tok: TextTokenizer, make, n_tokens: int, seed: int) -> dict:
    """Drive the constraint with seeded random logits for ``n_tokens`` tokens (restarting a finished
    run); per-token microseconds of the unconstrained pieces and of the constraint's own."""
    c = make()
    t = time.perf_counter()
    state = c.start(tok)
    cold_ms = (time.perf_counter() - t) * 1e3
    rng = np.random.default_rng(seed)
    sampler = Sampler(SamplingConfig(do_sample=True, seed=seed))
    base, own, runs, generated = [], [], 1, []
    n_vocab = tok.vocab_size
    while len(own) < n_tokens:
        logits = rng.standard_normal(n_vocab).astype(np.float32) * 3
        t0 = time.perf_counter()
        x = sampler.adjust(logits, generated, generated)
        t1 = time.perf_counter()
        x = state.mask(x)
        t2 = time.perf_counter()
        token = sampler.pick(x)
        t3 = time.perf_counter()
        done = token == tok.eos_id
        if not done:
            state.advance(token)
            generated.append(token)
        t4 = time.perf_counter()
        base.append((t1 - t0) + (t3 - t2))
        own.append((t2 - t1) + (t4 - t3))
        if done or state.done:
            t = time.perf_counter()
            state, generated, runs = c.start(tok), [], runs + 1
            own[-1] += time.perf_counter() - t  # a cached start (matcher copy) is part of the cost
    us = np.asarray(own) * 1e6
    return dict(kind=c.kind, tokens=len(own), runs=runs, first_start_ms=round(cold_ms, 3),
                mask_us_mean=round(float(us.mean()), 2), mask_us_p50=round(float(np.percentile(us, 50)), 2),
                mask_us_p90=round(float(np.percentile(us, 90)), 2), mask_us_max=round(float(us.max()), 2),
                sampling_us_mean=round(float(np.mean(base) * 1e6), 2))


def llama_tokenizer_dir(gguf: Path) -> Path:
    """A tokenizer.json folder converted from a llama.cpp vocabulary GGUF (cached by content hash)."""
    import hashlib

    from edgevlm.model.load import cache_dir

    out = cache_dir() / "tokenizers" / f"gguf-{hashlib.sha256(gguf.read_bytes()).hexdigest()[:16]}"
    if not (out / "tokenizer.json").is_file():
        from transformers import AutoTokenizer  # builds the BPE merges from the scores: ~2 min

        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(out))
    return out


def decode_row(bundle: Path, n: int, threads: int | None) -> dict:
    """Unconstrained and JSON-schema decode speed of ``bundle`` (text prompt, greedy)."""
    from edgevlm.runtime import Runtime

    opts = {} if threads is None else {"threads": threads}
    with Runtime.load(bundle, **opts) as rt:
        prompt = "Is there a person? How many? Answer in JSON."
        rt.generate(prompt=prompt, max_new_tokens=2)  # warm-up
        free = rt.generate(prompt=prompt, max_new_tokens=n, ignore_eos=True)
        con = rt.generate(prompt=prompt, max_new_tokens=n, json_schema=SCHEMA)
        return dict(kind="decode", bundle=str(bundle), backend=rt.backend.name,
                    quantize=getattr(rt.manifest.target_info, "quantize", None), vocab_size=rt.tokenizer.vocab_size,
                    decode_tokens=free.timings.n_generated, decode_tok_s=free.timings.decode_tok_s,
                    decode_step_ms=1e3 / free.timings.decode_tok_s,
                    constrained_tokens=con.timings.n_generated, constrained_decode_tok_s=con.timings.decode_tok_s,
                    constrained_finish=con.finish_reason, constrained_text=con.text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, help="a 1.7B bundle: its tokenizer, and its decode step for the ratio")
    p.add_argument("--tokenizer", type=Path, help="a tokenizer folder (default: the bundle's)")
    p.add_argument("--llama-vocab-gguf", type=Path, help="llama.cpp's ggml-vocab-llama-spm.gguf (see above)")
    p.add_argument("--tokens", type=int, default=2000, help="tokens per constraint kind (part 1)")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="JSONL file to append to")
    args = p.parse_args(argv)
    folder = llama_tokenizer_dir(args.llama_vocab_gguf) if args.llama_vocab_gguf else args.tokenizer or args.bundle
    if folder is None:
        p.error("give --bundle or --tokenizer")
    tok = TextTokenizer.from_dir(folder, bos_id=1, eos_id=2)
    t = time.perf_counter()
    _engine(tok)
    common = dict(vocab_size=tok.vocab_size, tokenizer=str(args.llama_vocab_gguf or folder), tokenizer_view_s=round(time.perf_counter() - t, 3),
                  cpu=cpu_model(), cpu_class=cpu_class(), libraries=library_versions(), git=git_state(),
                  time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    import llguidance

    common["libraries"]["llguidance"] = llguidance.__version__
    rows = [dict(common, **time_kind(tok, make, args.tokens, args.seed)) for make in KINDS.values()]
    if args.bundle is not None:
        dec = decode_row(args.bundle, args.decode_tokens, args.threads)
        for r in rows:
            r["overhead_of_decode_step"] = round(r["mask_us_mean"] / (dec["decode_step_ms"] * 1e3), 5)
        rows.append(dict(common, **dec))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    for r in rows:
        print({k: v for k, v in r.items() if k not in ("libraries", "git", "cpu", "tokenizer")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
