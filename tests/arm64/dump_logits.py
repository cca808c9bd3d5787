"""Teacher-forced logits of bundles on the torch-free runtime: the same script runs on the x86 host
(the reference: greedy) and under the emulated Arm CPU (fed the reference's tokens).

    python dump_logits.py JOB.json

``JOB.json``: ``{"bundles": {name: path | {"path": path, "options": {...}}}, "cases": [{"image": path, "prompt": str}], "steps": N,
"threads": 1, "out": dir, "tokens": {name: [[token, ...] per case]} | null}``. For each bundle it
writes ``out/<name>.npz`` with, per case ``i``: ``ids_i`` (prompt ids: tokenizer parity),
``pixels_i`` (preprocessing parity), ``vision_i`` (visual embeddings), ``logits_i`` ([S, V]) and
``tokens_i`` (the tokens fed after each step: the argmax without ``tokens``, else the given ones);
and ``out/<name>.json`` with the CPU class it ran on. Imports only ``edgevlm.runtime`` (no torch).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def run_case(rt, image: str, prompt: str, steps: int, forced: list[int] | None) -> dict:
    from edgevlm.runtime.generate import split_segments

    ids = rt.prompt_ids(prompt, with_image=True)
    pixels = rt.pixel_values(image)
    vision = np.asarray(rt.backend.encode_image(pixels), np.float32)
    logits = [np.asarray(rt.backend.prefill(split_segments(ids, vision)), np.float32).copy()]
    tokens = []
    eos = rt.manifest.tokens.eos_id
    for i in range(steps):
        tok = int(np.argmax(logits[-1])) if forced is None else int(forced[i])
        tokens.append(tok)
        if i + 1 == steps or (forced is None and tok == eos) or (forced is not None and i + 1 == len(forced)):
            break
        logits.append(np.asarray(rt.backend.decode(tok), np.float32).copy())
    return {"ids": np.asarray(ids, np.int64), "pixels": np.asarray(pixels, np.float32), "vision": vision,
            "logits": np.stack(logits), "tokens": np.asarray(tokens, np.int64)}


def dump(job: dict) -> None:
    import platform

    from edgevlm.runtime import Runtime
    from edgevlm.runtime.hostcpu import cpu_class, cpu_flags

    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    for name, spec in job["bundles"].items():
        spec = spec if isinstance(spec, dict) else {"path": spec}
        rt = Runtime.load(spec["path"], threads=job.get("threads", 1), image_cache_mb=0, **spec.get("options", {}))
        arrays = {}
        for i, case in enumerate(job["cases"]):
            forced = None if not job.get("tokens") else job["tokens"][name][i]
            for k, v in run_case(rt, case["image"], case["prompt"], job["steps"], forced).items():
                arrays[f"{k}_{i}"] = v
        np.savez(out / f"{name}.npz", **arrays)
        (out / f"{name}.json").write_text(json.dumps({
            "cpu_class": cpu_class(), "cpu_flags": cpu_flags(), "machine": platform.machine(),
            "backend": rt.backend.name}))
        rt.backend.close()


if __name__ == "__main__":
    dump(json.loads(Path(sys.argv[1]).read_text()))
