"""The token-level check at export: held-out ShapesVQA questions answered by the finished bundle
beside the PyTorch model it came from, teacher-forced on PyTorch's greedy answer.

The per-graph tolerances say each graph is close; this says what a user sees: does the bundle pick
the same next token, and how far apart are the two next-token distributions (KL)? Recorded in the
manifest (``target_info.token_check``; per quant type for GGUF), so a user sees what a precision
costs without running the benchmark suite (whose ``fidelity`` matrices compute the same record). Where the variant promises logit parity (fp32, ``atol``
given), the export fails when the logits differ by more than ``atol`` or a token differs where
PyTorch's top-1 lead is clear (``fidelity.Comparison.problems``); quantised variants are reported.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from edgevlm.runtime.errors import EdgeVLMError

PROMPT_SEED = 4321  # not the calibration draw (seed 1234)
STEPS = 8
PROMPTS = 4  # held-out prompts by default (--token-check N)


def add_argument(p: argparse.ArgumentParser, per: str = "the bundle") -> None:
    """``--token-check N`` for an exporter's CLI (``per``: what answers the prompts)."""
    p.add_argument("--token-check", type=int, default=PROMPTS, metavar="N",
                   help=f"held-out prompts {per} answers beside PyTorch at export; KL divergence and same-top-token "
                        "rate go into the manifest (0: skip) (default: %(default)s)")


def check_prompt_count(n: int) -> int:
    """``n`` if it is a valid ``--token-check``; exporters call this before any slow model load."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise EdgeVLMError(f"--token-check must be an integer >= 0, got {n!r}")
    return n


def held_out_prompts(n: int) -> list[tuple]:
    """``n`` (image, question) pairs from a fixed ShapesVQA test draw, question types in rotation."""
    from edgevlm.train.data.shapes import make_item, render_scene

    out = []
    for i in range(n):
        scene, qas = make_item(PROMPT_SEED, "test", i)
        out.append((render_scene(scene), qas[0][0]))
    return out


def held_out_inputs(model, n_prompts: int) -> list[tuple[list[int], np.ndarray]]:
    """``held_out_prompts`` as the model sees them: (prompt ids, pixel values [1, 3, S, S])."""
    return [model.processor(image, question) for image, question in held_out_prompts(n_prompts)]


def compare_heldout(model, target, n_prompts: int, steps: int = STEPS) -> list:
    """``fidelity.compare_greedy`` of ``model`` (PyTorch, the reference) and the ``target`` backend
    on ``n_prompts`` held-out prompts, each answer run to the reference's end of sequence or ``steps``."""
    from edgevlm.model.torch_backend import TorchBackend
    from edgevlm.runtime.fidelity import compare_greedy

    ref = TorchBackend(model)
    return [compare_greedy(ref, target, ids, pixels, steps, eos_id=model.cfg.tokens.eos_id)
            for ids, pixels in held_out_inputs(model, n_prompts)]


def check_tokens(model, bundle_dir: Path, manifest, n_prompts: int, atol: float | None = None,
                 backend: str = "ort", steps: int = STEPS, **options):
    """Compare the bundle in ``bundle_dir`` (read through ``manifest``, before it is committed)
    with ``model`` on ``n_prompts`` held-out prompts. Returns the manifest record (``TokenCheck``);
    with ``atol``, raises EdgeVLMError where parity breaks."""
    from edgevlm.runtime.backends import get_backend
    from edgevlm.runtime.fidelity import summarise
    from edgevlm.runtime.target_info import TokenCheck

    with get_backend(backend)(Path(bundle_dir), manifest, **options) as target:
        comparisons = compare_heldout(model, target, n_prompts, steps)
    record = TokenCheck(**summarise(comparisons), steps=steps, prompts=f"ShapesVQA test draw, seed {PROMPT_SEED}",
                        logit_atol=atol)
    for i, c in enumerate(comparisons if atol is not None else []):
        problems = c.problems(atol)
        if problems:
            raise EdgeVLMError(f"token check: held-out prompt {i}: {problems[0]}; the bundle does not compute "
                               "what the PyTorch model computes")
    return record
