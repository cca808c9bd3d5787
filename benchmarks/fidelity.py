"""Fidelity cases: how far a deployable target's next-token distributions are from PyTorch fp32.

A matrix with a ``fidelity`` section (``benchmarks/matrices/fidelity.yaml``) turns every
backend x precision into a fidelity case instead of a latency case:

    fidelity: {prompts: 8, steps: 16}   # held-out ShapesVQA prompts, answer steps per prompt

The measurement (``measure_fidelity``, run by ``case.py measure`` in a fresh process) loads the
fp32 PyTorch model as the reference and the case's target (a bundle on ``ort`` / ``llamacpp`` /
``trt``, or PyTorch at bf16/fp16), and runs ``export.token_check.compare_heldout``: each prompt's
answer is the reference's greedy answer (to its end of sequence), fed to both, so KL(p_ref || p_target),
"same top token", RMS Δp and max |Δlogit| are compared position by position, as llama.cpp's
``perplexity --kl-divergence`` does for text; vision-embedding cosine comes from the same images.
For a trained model with an ``eval`` spec the target's and the reference's held-out exact-match
accuracy (overall and per question type) are measured free-running too.

``TARGETS`` holds the goals a report checks each record against (never asserted in tests).
"""
from __future__ import annotations

from edgevlm.runtime.memory import peak_rss_mb

DEFAULTS = {"prompts": 8, "steps": 16}
REFERENCE = ("torch", "fp32")

# (backend, precision) -> the bar it should clear: minimum same-top-token rate, maximum mean KL,
# minimum vision-embedding cosine, maximum held-out accuracy drop in points (trained models).
_F16 = {"same_top_token": 0.995, "vision_cosine_min": 0.999, "accuracy_drop": 1.0}
_INT8 = {"same_top_token": 0.98, "vision_cosine_min": 0.99, "accuracy_drop": 1.0}
_Q4 = {"same_top_token": 0.92, "accuracy_drop": 3.0}
TARGETS: dict[tuple[str, str], dict] = {
    ("ort", "fp32"): {"same_top_token": 1.0, "kl_mean": 1e-6, "vision_cosine_min": 0.99999},
    ("ort", "fp16"): _F16, ("llamacpp", "f16"): {**_F16, "vision_cosine_min": None}, ("trt", "fp16"): _F16,
    ("torch", "fp16"): _F16, ("torch", "bf16"): {**_F16, "same_top_token": 0.98},
    ("ort", "int8"): _INT8, ("llamacpp", "q8_0"): {**_INT8, "vision_cosine_min": None}, ("trt", "int8"): _INT8,
    ("ort", "int4"): {**_Q4, "vision_cosine_min": 0.99}, ("llamacpp", "q4_k_m"): _Q4, ("llamacpp", "q4_0"): _Q4,
    ("llamacpp", "q5_k_m"): {**_Q4, "same_top_token": 0.95},
    ("executorch", "fp32"): {"same_top_token": 1.0, "kl_mean": 1e-6, "vision_cosine_min": 0.99999},
    ("executorch", "8da4w"): _Q4, ("executorch", "int8"): {**_INT8, "vision_cosine_min": 0.99999},
}
for _fmt in ("vnni", "reduce-range"):  # the other --int8-target formats: the same bars as portable's
    TARGETS[("ort", f"int8_{_fmt}")], TARGETS[("ort", f"int4_{_fmt}")] = TARGETS[("ort", "int8")], TARGETS[("ort", "int4")]
# llama.cpp's mmproj is written in f16 and (by default) without the CLS token (export/gguf_mmproj.py),
# so its vision cosine measures that choice, not the LLM quant type: no vision target for GGUF rows.


def target_misses(rec: dict) -> list[str]:
    """The goals of ``TARGETS`` a fidelity record misses (empty: all met, or no goal for it)."""
    goal = TARGETS.get((rec["backend"], rec["precision"]), {})
    f = rec.get("fidelity") or {}
    out = []
    if goal.get("same_top_token") is not None and f.get("same_top_token", 1.0) < goal["same_top_token"]:
        out.append(f"same top {f['same_top_token']:.1%} < {goal['same_top_token']:.1%}")
    if goal.get("kl_mean") is not None and f.get("kl_mean", 0.0) >= goal["kl_mean"]:
        out.append(f"mean KL {f['kl_mean']:.2g} >= {goal['kl_mean']:.0e}")
    vis = f.get("vision_cosine_min")
    if goal.get("vision_cosine_min") is not None and vis is not None and vis < goal["vision_cosine_min"]:
        out.append(f"vision cosine {vis:.5f} < {goal['vision_cosine_min']}")
    drop = accuracy_drop(rec)
    if goal.get("accuracy_drop") is not None and drop is not None and drop > goal["accuracy_drop"]:
        out.append(f"accuracy drop {drop:.1f} > {goal['accuracy_drop']:.0f} points")
    return out


def accuracy_drop(rec: dict) -> float | None:
    """Held-out accuracy of the reference minus the target's, in points (None: not measured)."""
    acc, ref = (rec.get("accuracy") or {}).get("accuracy"), (rec.get("reference_accuracy") or {}).get("accuracy")
    return None if acc is None or ref is None else round(100 * (ref - acc), 2)


def measure_fidelity(case: dict, prepared: dict) -> dict:
    """The fidelity record of one case (``case.py measure`` calls this for ``task: fidelity``)."""
    from edgevlm.benchmarks.case import held_out_accuracy, load_torch_model, open_runtime
    from edgevlm.model.torch_backend import torch_runtime
    from edgevlm.export.token_check import PROMPT_SEED
    from edgevlm.runtime.fidelity import summarise

    spec = {**DEFAULTS, **(case.get("fidelity") or {})}
    rt, _ = open_runtime(case, prepared)
    comparisons = compare_with_reference(case, rt.backend, int(spec["prompts"]), int(spec["steps"]))
    out = {"fidelity": {**summarise(comparisons), "steps": int(spec["steps"]),
                        "prompts": f"ShapesVQA test draw, seed {PROMPT_SEED}"}}
    if case.get("eval"):
        out["accuracy"] = held_out_accuracy(rt, case["eval"])
        out["reference_accuracy"] = held_out_accuracy(torch_runtime(load_torch_model(case)), case["eval"])
    rt.close()
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def compare_with_reference(case: dict, target, n_prompts: int, steps: int) -> list:
    """``compare_greedy`` of PyTorch fp32 and ``target`` on the held-out prompts. The reference's side is
    recorded once per model (content-keyed), prompts and steps and replayed for every other target,
    so a matrix runs the fp32 reference once instead of once per case."""
    import numpy as np

    from edgevlm.benchmarks.case import load_torch_model
    from edgevlm.export.token_check import held_out_inputs
    from edgevlm.model.torch_backend import TorchBackend
    from edgevlm.runtime.fidelity import Recorder, Replay, compare_greedy

    path = reference_path(case, n_prompts, steps)
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            eos = int(z["eos_id"])
            return [compare_greedy(Replay(z[f"vision{i}"], z[f"logits{i}"]), target, z[f"ids{i}"].tolist(),
                                   z[f"pixels{i}"], steps, eos_id=eos) for i in range(n_prompts)]
    model = load_torch_model(case)
    eos, rec, saved, out = model.cfg.tokens.eos_id, Recorder(TorchBackend(model)), {}, []
    for i, (ids, pixels) in enumerate(held_out_inputs(model, n_prompts)):
        out.append(compare_greedy(rec, target, ids, pixels, steps, eos_id=eos))
        saved.update({f"ids{i}": np.asarray(ids, np.int64), f"pixels{i}": pixels, f"vision{i}": rec.vision,
                      f"logits{i}": np.stack(rec.logits)})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, eos_id=np.int64(eos), **saved)
    tmp.replace(path)
    return out


def reference_path(case: dict, n_prompts: int, steps: int):
    """Where the recorded fp32 reference of the case's model lives (keyed by content, like exports)."""
    import torch

    from edgevlm.benchmarks.matrix import cache_root, content_key
    from edgevlm.export.token_check import PROMPT_SEED

    key = content_key(case, reference="torch fp32", prompts=n_prompts, steps=steps, seed=PROMPT_SEED,
                      torch=torch.__version__)
    return cache_root().parent / "fidelity-reference" / f"{key}.npz"
