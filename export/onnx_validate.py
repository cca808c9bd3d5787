"""Checks every exported graph: ``onnx.checker`` and ONNX Runtime against PyTorch on fresh inputs.

Like optimum's per-model ATOL, each graph and variant has a tolerance: an output passes when
``max|ort - torch| <= atol + rtol * max|torch|``. fp32 graphs must match closely; fp16 and
quantized graphs get a bound relative to the output's scale (their task-level fidelity is measured
by the accuracy tests, not here). The decoder is checked in both modes it serves: prefill with an
empty past and decode with a cache.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgevlm.runtime.errors import EdgeVLMError

# variant -> graph -> (atol, rtol)
TOLERANCES: dict[str, dict[str, tuple[float, float]]] = {
    "fp32": {"vision_encoder": (1e-4, 1e-4), "embed_tokens": (1e-6, 0.0), "decoder": (1e-4, 1e-4)},
    "fp16": {"vision_encoder": (1e-3, 2e-2), "embed_tokens": (1e-3, 1e-3), "decoder": (1e-3, 2e-2)},
    "int8": {"vision_encoder": (1e-3, 0.25), "embed_tokens": (1e-6, 0.0), "decoder": (1e-3, 0.25)},
    "int4": {"vision_encoder": (1e-3, 0.25), "embed_tokens": (1e-6, 0.0), "decoder": (1e-3, 0.4)},
}

_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32}


def check_graph(path: str | Path) -> None:
    """``onnx.checker`` on the file path (works for graphs with external data over 2 GB)."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise EdgeVLMError(f"{Path(path).name}: fails onnx.checker: {e}") from None


def cpu_session(path: str | Path, threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def validation_cases(model, graph: str, gqa: bool = False) -> list[tuple[str, dict]]:
    """Named input sets, different from the export examples: prefill (empty past) and decode.
    ONNX Runtime's GroupQueryAttention takes several new tokens over a past at batch 1 only, so
    the GQA decoder's batch-2 cases are a prefill and a decode step instead of a chunk."""
    from .onnx_graphs import example_inputs

    if graph == "vision_encoder":
        return [("batch1", example_inputs(model, graph, batch=1, seed=11)),
                ("batch3", example_inputs(model, graph, batch=3, seed=12))]
    if graph == "embed_tokens":
        return [("batch1", example_inputs(model, graph, batch=1, seq=7, seed=13))]
    cases = [("prefill", example_inputs(model, graph, batch=1, seq=6, past=0, seed=14)),
             ("decode", example_inputs(model, graph, batch=1, seq=1, past=9, seed=15))]
    if not gqa:
        return [*cases, ("batch2_chunk", example_inputs(model, graph, batch=2, seq=4, past=3, seed=16))]
    return [*cases, ("batch1_chunk", example_inputs(model, graph, batch=1, seq=4, past=3, seed=16)),
            ("batch2_prefill", example_inputs(model, graph, batch=2, seq=4, past=0, seed=17)),
            ("batch2_decode", example_inputs(model, graph, batch=2, seq=1, past=5, seed=18))]


def torch_outputs(model, graph: str, inputs: dict) -> list[np.ndarray]:
    import torch

    from .onnx_graphs import graph_module

    with torch.no_grad():
        out = graph_module(model, graph)(*inputs.values())
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [o.float().numpy() for o in out]


def ort_outputs(session, inputs: dict) -> list[np.ndarray]:
    feeds = {}
    for meta in session.get_inputs():
        x = inputs[meta.name].numpy()
        feeds[meta.name] = x.astype(_NP_TYPES.get(meta.type, x.dtype), copy=False)
    return [np.asarray(o, dtype=np.float32) for o in session.run(None, feeds)]


def image_cases(pixels) -> list[tuple[str, dict]]:
    """Validation cases from real preprocessed images (for graphs calibrated on images: random
    pixels fall outside the calibrated activation ranges and say nothing about real inputs)."""
    import torch

    x = np.concatenate([np.asarray(p, dtype=np.float32) for p in pixels])  # [B, 3, S, S]
    return [(f"images{len(x)}", {"pixel_values": torch.from_numpy(x)})]


def validate_graph(model, graph: str, path: str | Path, variant: str = "fp32",
                   cases: list[tuple[str, dict]] | None = None, gqa: bool = False) -> dict:
    """Run ``path`` in ONNX Runtime and the torch module on each case (default:
    ``validation_cases``); raise when over tolerance.

    Returns {"max_abs_diff", "max_abs_diff_first_output", "ref_scale", "atol", "rtol", "cases"}.
    """
    check_graph(path)
    atol, rtol = TOLERANCES[variant][graph]
    session = cpu_session(path)
    names = [o.name for o in session.get_outputs()]
    report: dict = {"atol": atol, "rtol": rtol, "cases": {}}
    worst, worst_first, scale = 0.0, 0.0, 0.0
    for case, inputs in cases or validation_cases(model, graph, gqa):
        ref = torch_outputs(model, graph, inputs)
        got = ort_outputs(session, inputs)
        diffs = {}
        for name, r, g in zip(names, ref, got):
            if r.shape != g.shape:
                raise EdgeVLMError(f"{Path(path).name}: output {name} has shape {g.shape} in ONNX Runtime, "
                                   f"{r.shape} in PyTorch ({case})")
            diffs[name] = float(np.abs(r - g).max()) if r.size else 0.0
            bound = atol + rtol * float(np.abs(r).max() if r.size else 0.0)
            if not np.isfinite(g).all() or diffs[name] > bound:
                raise EdgeVLMError(f"{Path(path).name} ({variant}): output {name} differs from PyTorch by "
                                   f"{diffs[name]:.3g} > tolerance {bound:.3g} on case {case!r}")
        first = names[0]
        worst_first = max(worst_first, diffs[first])
        worst = max(worst, *diffs.values())
        scale = max(scale, float(np.abs(ref[0]).max()))
        report["cases"][case] = {first: diffs[first], "max_all_outputs": max(diffs.values())}
    report.update(max_abs_diff=worst, max_abs_diff_first_output=worst_first, ref_scale=scale)
    return report
