"""Checks every exported graph: ``onnx.checker`` and ONNX Runtime against PyTorch on fresh inputs.

Like optimum's per-model ATOL, each graph and variant has a tolerance. fp32 and fp16 outputs pass
when ``max|ort - torch| <= atol + rtol * max|torch|`` and the relative L2 error
``||ort - torch|| / ||torch||`` is under its bound. Quantised graphs are judged by the relative L2
error alone (one outlier position says little about int4 weights; the max is still reported), on
realistic inputs: real images for the calibrated vision graph, embedding rows and a
PyTorch-computed past for the decoder. Task-level fidelity is the accuracy tests' job.
The decoder is checked in both modes it serves: prefill with an empty past and decode with a cache.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgevlm.runtime.errors import EdgeVLMError
from edgevlm.runtime.graph_io import ATTENTION_MASK, INPUTS_EMBEDS, PIXEL_VALUES, POSITION_IDS, past_names

# variant -> graph -> bounds: {"rel_l2"} (relative L2 error), {"atol", "rtol"} (max |ort - torch| <=
# atol + rtol * max|torch|), or both. fp32/fp16 bounds are set from benchmarks/export_noise.py runs
# (docs/int8-portability.md, "How the export checks are set"): the largest correct-export error
# seen, over thread pairs and both shapes, with at least 5x margin; a damaged export (one weight
# perturbed 5%, a vision select layer off by one, CLS kept) is 50-1,200x over them.
#   fp32: <= 3.3e-6 relative here (AMD EPYC, x86-vnni, tiny and 1.7B); 1.4e-4 relative (5.2e-4 on
#         logits of scale ~3.8) on a Xeon with AMX at 1.7B (issue 37), where 1e-4 + 1e-4 x scale
#         had failed it: bound 1e-3 relative, 7x over that.
#   fp16: <= 2.3e-3 relative, 1.7e-3 rel. L2 (1.7B decoder): 1e-3 + 2e-2 x scale, rel. L2 1e-2 (5.8x).
TOLERANCES: dict[str, dict[str, dict[str, float]]] = {
    "fp32": {"vision_encoder": {"atol": 1e-4, "rtol": 1e-3, "rel_l2": 1e-3},
             "embed_tokens": {"atol": 1e-6, "rtol": 0.0},
             "decoder": {"atol": 1e-4, "rtol": 1e-3, "rel_l2": 1e-3}},
    "fp16": {"vision_encoder": {"atol": 1e-3, "rtol": 2e-2, "rel_l2": 1e-2},
             "embed_tokens": {"atol": 1e-3, "rtol": 1e-3},
             "decoder": {"atol": 1e-3, "rtol": 2e-2, "rel_l2": 1e-2}},
    # int8 QDQ vision vs PyTorch: 0.013 measured (tiny, --int8-target portable). The quantised
    # decoders are judged against their fp32 twins (the kernels' error; see onnx_quant_check): int8
    # integer arithmetic is exact there unless a kernel saturates (0 measured on VNNI, tiny and 1.7B)
    "int8": {"vision_encoder": {"rel_l2": 0.1}, "embed_tokens": {"atol": 1e-6, "rtol": 0.0},
             "decoder": {"rel_l2": 0.01}},
    # int4: 0.012 tiny vs the twin; vs fp32 the weight format's distance (0.19 tiny, 0.52
    # mobilevlm-1.7b, random weights) is reported
    "int4": {"vision_encoder": {"rel_l2": 0.1}, "embed_tokens": {"atol": 1e-6, "rtol": 0.0},
             "decoder": {"rel_l2": 0.05}},
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


def decoder_case(model, batch: int, seq: int, past: int, seed: int) -> dict:
    """Decoder inputs a real prompt could produce: embedding rows of random token ids, and a past
    the PyTorch decoder computed from the first ``past`` of them (random activations would stray
    outside what quantised weights were fitted for and make the bound meaningless)."""
    import torch

    from .onnx_graphs import example_inputs, graph_module

    g = torch.Generator().manual_seed(seed)
    emb = model.llm.get_input_embeddings().weight
    x = emb[torch.randint(0, emb.shape[0], (batch, past + seq), generator=g)].detach()  # [B, P + T, D]
    inputs = example_inputs(model, "decoder", batch=batch, seq=past, past=0, seed=seed)  # empty past
    inputs[INPUTS_EMBEDS] = x[:, :past]
    names = past_names(model.cfg.llm.num_hidden_layers)
    if past:
        with torch.no_grad():
            present = graph_module(model, "decoder")(*inputs.values())[1:]  # [B, H_kv, P, Dh] each
        inputs.update(zip(names, present))
    inputs.update({INPUTS_EMBEDS: x[:, past:], ATTENTION_MASK: torch.ones(batch, past + seq, dtype=torch.long),
                   POSITION_IDS: torch.arange(past, past + seq).repeat(batch, 1)})
    return inputs


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
    cases = [("prefill", decoder_case(model, batch=1, seq=6, past=0, seed=14)),
             ("decode", decoder_case(model, batch=1, seq=1, past=9, seed=15))]
    if not gqa:
        return [*cases, ("batch2_chunk", decoder_case(model, batch=2, seq=4, past=3, seed=16))]
    return [*cases, ("batch1_chunk", decoder_case(model, batch=1, seq=4, past=3, seed=16)),
            ("batch2_prefill", decoder_case(model, batch=2, seq=4, past=0, seed=17)),
            ("batch2_decode", decoder_case(model, batch=2, seq=1, past=5, seed=18))]


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
    return [(f"images{len(x)}", {PIXEL_VALUES: torch.from_numpy(x)})]


def validate_graph(model, graph: str, path: str | Path, variant: str = "fp32",
                   cases: list[tuple[str, dict]] | None = None, gqa: bool = False, advice: str = "",
                   judge: bool = True, reference: str | Path | None = None, threads: int = 0,
                   per_output: bool = False) -> dict:
    """Run ``path`` in ONNX Runtime and the torch module on each case (default:
    ``validation_cases``); with ``judge``, raise on the first output over tolerance (``advice``,
    what to try, ends the message); without, only measure and list the failures in the report.
    ``reference``: another ONNX graph whose ONNX Runtime outputs stand in for the torch module's.
    ``threads``: ONNX Runtime's intra-op threads (0: all). ``per_output``: each case also keeps
    every output's ``output_errors`` (for measurements that re-judge them later).

    Returns {"max_abs_diff", "max_abs_diff_first_output", "max_rel_l2", "max_rel_l2_all_outputs",
    "ref_scale", "tolerance", "cases", "failures"}; each case holds ``case_stats``.
    """
    check_graph(path)
    tol = TOLERANCES[variant][graph]
    session = cpu_session(path, threads)
    ref_session = cpu_session(reference, threads) if reference else None
    names = [o.name for o in session.get_outputs()]
    report: dict = {"tolerance": dict(tol), "cases": {}, "failures": []}
    for case, inputs in cases or validation_cases(model, graph, gqa):
        ref = ort_outputs(ref_session, inputs) if ref_session else torch_outputs(model, graph, inputs)
        got = ort_outputs(session, inputs)
        errors, failed = {}, len(report["failures"])
        for name, r, g in zip(names, ref, got):
            if r.shape != g.shape:
                raise EdgeVLMError(f"{Path(path).name}: output {name} has shape {g.shape} in ONNX Runtime, "
                                   f"{r.shape} in PyTorch ({case})")
            errors[name] = output_errors(r, g)
            problem = tolerance_problem(tol, errors[name])
            if problem:
                where = f"{Path(path).name} ({variant}): output {name}, case {case!r}"
                report["failures"].append(f"{where}: {problem}")
                if judge:
                    from edgevlm.runtime.hostcpu import cpu_class  # read only when reporting a failure

                    raise EdgeVLMError(f"{where}: {problem} (on a {cpu_class()} CPU)"
                                       f"{'; ' + advice if advice else ''}")
        report["cases"][case] = {**case_stats(tol, errors[names[0]], errors.values()),
                                 "passed": len(report["failures"]) == failed}
        if per_output:
            report["cases"][case]["outputs"] = errors
    cs = report["cases"].values()
    report.update(max_abs_diff=max(c["max_abs_all"] for c in cs), max_abs_diff_first_output=max(c["max_abs"] for c in cs),
                  max_rel_l2=max(c["rel_l2"] for c in cs), max_rel_l2_all_outputs=max(c["rel_l2_all"] for c in cs),
                  ref_scale=max(c["ref_scale"] for c in cs))
    return report


def output_errors(ref: np.ndarray, got: np.ndarray) -> dict:
    """{"max_abs": max |got - ref|, "rel_l2": ||got - ref|| / ||ref||, "scale": max |ref|,
    "finite"}; zero for empty outputs (an empty KV cache)."""
    finite = bool(np.isfinite(got).all())
    if not ref.size:
        return {"max_abs": 0.0, "rel_l2": 0.0, "scale": 0.0, "finite": finite}
    diff = got - ref
    return {"max_abs": float(np.abs(diff).max()), "scale": float(np.abs(ref).max()), "finite": finite,
            "rel_l2": float(np.linalg.norm(diff) / max(float(np.linalg.norm(ref)), 1e-12))}


def case_stats(tol: dict, first: dict, outputs) -> dict:
    """One case's record: the first output's errors (logits, features), the worst over all outputs,
    and ``bound_ratio``, the worst output's error over its bound (<= 1 passes)."""
    outputs = list(outputs)
    return {"max_abs": first["max_abs"], "rel_l2": first["rel_l2"], "ref_scale": first["scale"],
            "max_abs_all": max(o["max_abs"] for o in outputs), "rel_l2_all": max(o["rel_l2"] for o in outputs),
            "max_rel_all": max(o["max_abs"] / o["scale"] if o["scale"] else 0.0 for o in outputs),
            "bound_ratio": max(bound_ratio(tol, o) for o in outputs), "finite": all(o["finite"] for o in outputs)}


def bound_ratio(tol: dict, err: dict) -> float:
    """An output's error over its bound, the worst of ``tol``'s criteria: relative L2 over
    ``rel_l2``, max |ort - torch| over ``atol + rtol * max|torch|`` (<= 1 passes; inf: not finite)."""
    if not err["finite"]:
        return float("inf")
    ratios = [0.0]
    if "rel_l2" in tol:
        ratios.append(err["rel_l2"] / tol["rel_l2"])
    if "atol" in tol:
        ratios.append(err["max_abs"] / (tol["atol"] + tol.get("rtol", 0.0) * err["scale"]))
    return max(ratios)


def tolerance_problem(tol: dict, err: dict) -> str | None:
    """Why an output's errors (``output_errors``) break ``tol``, or None."""
    if not err["finite"]:
        return "ONNX Runtime produced non-finite values"
    if "rel_l2" in tol and err["rel_l2"] > tol["rel_l2"]:
        return f"differs from PyTorch by a relative L2 error of {err['rel_l2']:.3g} > tolerance {tol['rel_l2']}"
    if "atol" in tol:
        bound = tol["atol"] + tol.get("rtol", 0.0) * err["scale"]
        if err["max_abs"] > bound:
            return f"differs from PyTorch by {err['max_abs']:.3g} > tolerance {bound:.3g}"
    return None
