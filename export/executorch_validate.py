"""Per-method check of a written ``.pte`` against PyTorch, before the bundle is committed.

Each method runs in ExecuTorch (``executorch.runtime``, the kernels the backend and the C++ runner
use) and in PyTorch on the same inputs. The decoder runs a 5-token prefill at position 0 and then one
decode step at position 5, so the static KV cache is part of what is checked. fp32 methods must
match the PyTorch model within ``TOLERANCES['fp32']``. A quantised decoder is judged against its
torchao-quantised PyTorch twin (the kernels' error, ``TOLERANCES[quantize]``); its distance from the
fp32 decoder (the format's error) is reported beside it, and the token check says what it costs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgevlm.runtime.errors import EdgeVLMError

from .executorch_graphs import METHODS, StaticCacheDecoder, example_args

# rel_l2 = ||got - ref|| / ||ref||; atol on the largest element difference
TOLERANCES: dict[str, dict[str, dict[str, float]]] = {
    "fp32": {"vision_encoder": {"atol": 1e-4, "rel_l2": 1e-3}, "token_embedding": {"atol": 1e-6},
             "text_decoder": {"atol": 1e-3, "rel_l2": 1e-3}},
    # vs the torchao twin: XNNPACK's integer kernels vs torchao's reference arithmetic (0.018 measured,
    # tiny 8da4w, random weights: both quantise activations per token but round differently); vs fp32
    # the format's error (0.20 there) is reported, and the token check says what it costs
    "8da4w": {"text_decoder": {"rel_l2": 0.05}},
    "int8": {"text_decoder": {"rel_l2": 0.05}},
}


def load_program(path: Path):
    from executorch.runtime import Runtime

    try:
        return Runtime.get().load_program(Path(path))
    except Exception as e:  # ExecuTorch raises RuntimeError/ValueError with its error code
        raise EdgeVLMError(f"{path}: ExecuTorch cannot load it ({type(e).__name__}: {e})") from None


def _decoder_cases(model) -> list[tuple[str, tuple]]:
    g = torch.Generator().manual_seed(1)
    d = model.cfg.llm.hidden_size
    prefill = torch.randn(1, 5, d, generator=g) * 0.02
    step = torch.randn(1, 1, d, generator=g) * 0.02
    return [("prefill T=5 at 0", (prefill, torch.tensor([0]))), ("decode at 5", (step, torch.tensor([5])))]


def cases(model, method: str) -> list[tuple[str, tuple]]:
    if method == "text_decoder":
        return _decoder_cases(model)
    return [("random", example_args(model, method, seq=7, seed=1))]


def errors(ref: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    r, g = ref.detach().float().numpy(), np.asarray(got, dtype=np.float32)
    if r.shape != g.shape:
        raise EdgeVLMError(f"shape {g.shape} in ExecuTorch, {r.shape} in PyTorch")
    diff = float(np.abs(r - g).max()) if r.size else 0.0
    return {"atol": diff, "rel_l2": float(np.linalg.norm(r - g) / max(np.linalg.norm(r), 1e-12))}


def _run_method(program, method: str, model, reference, fp32_reference=None) -> dict:
    """{case: errors} of one method vs ``reference`` (and vs ``fp32_reference`` where given)."""
    loaded = program.load_method(method)
    out = {}
    with torch.no_grad():
        for case, args in cases(model, method):
            got = loaded.execute(list(args))[0]
            row = errors(reference(*args), got)
            if fp32_reference is not None:
                row["vs_fp32_rel_l2"] = errors(fp32_reference(*args), got)["rel_l2"]
            out[case] = row
    return out


def validate_pte(path: Path, model, modules: dict, quantize: str, max_seq_len: int, judge: bool = True) -> dict:
    """{method: {tolerance, cases, failures}} for the ``.pte`` at ``path``; raises EdgeVLMError on
    the first failure when ``judge`` (else failures are listed)."""
    report = {}
    for method in METHODS:
        program = load_program(path)  # one per method: the Python runtime shares arenas between a program's methods
        quantised = method == "text_decoder" and quantize != "fp32"
        tol = TOLERANCES[quantize if quantised else "fp32"][method]
        reference = modules[method]
        fp32 = StaticCacheDecoder(model, max_seq_len).eval() if quantised else None
        try:
            rows = _run_method(program, method, model, reference, fp32)
        except EdgeVLMError as e:
            raise EdgeVLMError(f"{Path(path).name}: method {method}: {e}") from None
        failures = [f"{method} ({case}): {k} {v[k]:.3g} > {limit:g}" for case, v in rows.items()
                    for k, limit in tol.items() if v[k] > limit]
        report[method] = {"tolerance": dict(tol), "reference": "torchao twin" if quantised else "PyTorch fp32",
                          "cases": rows, "failures": failures}
        if failures and judge:
            raise EdgeVLMError(f"{Path(path).name}: {failures[0]}: the .pte does not compute what PyTorch computes")
    return report


def damage_report(report: dict) -> list[str]:
    """Every failed check of a ``validate_pte`` report."""
    return [f for method in report.values() for f in method["failures"]]
