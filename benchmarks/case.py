"""The per-case worker, run in a fresh subprocess by ``run.py`` (honest peak memory, no warm caches):

    python -m edgevlm.benchmarks.case prepare --case case.json --out prepared.json
    python -m edgevlm.benchmarks.case measure --case case.json --out result.json

``prepare`` builds the case's bundle when the content-addressed cache does not hold it yet, in its
own process so that export memory never shows up in a measurement; ``describe`` (called by the
runner) reads the analytic shape, artifact sizes and the bytes a decode step reads. ``measure`` loads the backend (or
a peer), does warm-up runs, then timed runs with a fixed image, prompt length and number of new
tokens (EOS ignored), and writes per-run timings, their median/p10/p90, peak memory and, for
trained model dirs, held-out accuracy. Only the torch backend and the Hugging Face peer import
torch; an ``ort`` or ``llamacpp`` measurement carries none of its memory. A fidelity case
(``task: fidelity``) is measured by ``fidelity.measure_fidelity`` instead of timed runs.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgevlm.benchmarks.matrix import bench_image, filler_question, image_prompt
from edgevlm.runtime.errors import EdgeVLMError
from edgevlm.runtime.hostcpu import resolve_threads
from edgevlm.runtime.memory import current_rss_mb, peak_rss_mb

METRICS = ("vision_ms", "tower_ms", "integrator_ms", "prefill_ms", "ttft_ms", "prefill_tok_s", "decode_tok_s",
           "total_ms")


# --- statistics and memory (shared with peers.py) ------------------------------------------------


def summarize(values: list[float | None]) -> dict | None:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    p10, med, p90 = np.percentile(vals, [10, 50, 90])
    return {"median": round(float(med), 3), "p10": round(float(p10), 3), "p90": round(float(p90), 3),
            "n": len(vals), "values": [round(v, 3) for v in vals]}


def threads_of(case: dict) -> int:
    """The case's thread count (0 or null: every usable core, as the runtime's ``threads`` option)."""
    return resolve_threads(int(case["workload"]["threads"] or 0))


def timed_runs(case: dict, run_once: Callable[[], dict]) -> list[dict]:
    """``warmup`` untimed calls, then ``runs`` calls; each returns a dict of per-run metrics."""
    for _ in range(int(case["warmup"])):
        run_once()
    return [run_once() for _ in range(int(case["runs"]))]


def collect_metrics(runs: list[dict]) -> dict:
    return {m: s for m in METRICS if (s := summarize([r.get(m) for r in runs])) is not None}


# --- prepare -------------------------------------------------------------------------------------


def model_config(case: dict):
    """The case's VLMConfig without building weights."""
    m = case["model"]
    overrides = dict(m.get("overrides") or {})
    if case.get("integrator"):
        overrides["integrator"] = case["integrator"]
    if m["source"] == "preset":
        from edgevlm.model.config import preset_config

        return preset_config(m["name"], **overrides)
    from edgevlm.model import checkpoint

    path = Path(m["path"])
    if checkpoint.is_edgevlm_dir(path):
        from edgevlm.model.config import override_config

        return override_config(checkpoint.read_config(path), **overrides)
    from edgevlm import load_model  # an official MobileVLM dir: its config needs the weights' shapes

    return load_model(str(path)).cfg


def accelerator(case: dict) -> str:
    """"cuda" / "gpu" when the matrix allows it (``accelerator: auto``, the default) and this backend
    can use a GPU here (CUDA torch, onnxruntime-gpu, a CUDA/Metal llama.cpp build), else "cpu"."""
    backend = case["backend"]
    if case.get("accelerator", "auto") == "cpu":
        return "cpu"
    if backend in ("torch", "hf_eager"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if backend == "ort":
        import onnxruntime

        return "cuda" if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else "cpu"
    if backend in ("llamacpp", "llamacpp_raw"):
        import llama_cpp

        return "gpu" if llama_cpp.llama_supports_gpu_offload() else "cpu"
    return "cuda"


def load_torch_model(case: dict, dtype: str = "fp32", device: str = "cpu"):
    import torch

    from edgevlm import load_model

    m = case["model"]
    overrides = dict(m.get("overrides") or {})
    if case.get("integrator"):
        overrides["integrator"] = case["integrator"]
    source = m["name"] if m["source"] == "preset" else m["path"]
    model = load_model(source, **overrides).eval()
    return model.to(device=device, dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype])


def prepare(case: dict) -> dict:
    """Build the case's bundle into ``case['export_dir']`` (the subprocess step; cache misses only)."""
    bundle = Path(case["export_dir"])
    if (bundle / "manifest.json").is_file():
        return {"export_cached": True}
    t = time.perf_counter()
    build_export(case, bundle)
    return {"export_cached": False, "export_s": round(time.perf_counter() - t, 1)}


def describe(case: dict) -> dict:
    """What the measurement and the report need to know about the case's model and artifact:
    the analytic shape, artifact sizes, the LLM bytes one decode step reads (run in the parent)."""
    from edgevlm.benchmarks.flops import config_shape

    shape = config_shape(model_config(case))
    if case["export"] is None:
        return {"shape": shape, "artifact": None, **torch_artifact(shape, case["precision"])}
    bundle = Path(case["export_dir"])
    return {"shape": shape, "artifact": str(bundle), **bundle_facts(bundle, case)}


def build_export(case: dict, bundle: Path) -> None:
    """The case's bundle; without the exporters' token check (the ``fidelity`` matrices measure it)."""
    spec = case["export"]
    model = load_torch_model(case)
    source = case["model"].get("path") or case["model"]["name"]
    bundle.parent.mkdir(parents=True, exist_ok=True)
    if spec["target"] == "onnx":
        from edgevlm.export.to_onnx import export_onnx

        export_onnx(model, bundle, dtype=spec["dtype"], quantize=spec["quantize"], source=source, progress=False,
                    token_check=0, int8_target=spec.get("int8_target", "portable"))
    elif spec["target"] == "gguf":
        from edgevlm.export.to_gguf import export_gguf

        export_gguf(model, bundle, spec["quants"], source=source, progress=False, token_check=0)
    elif spec["target"] == "executorch":
        from edgevlm.export.to_executorch import export_executorch

        export_executorch(model, bundle, spec["quantize"], source=source, token_check=0)
    else:
        raise EdgeVLMError(f"no exporter wired for target {spec['target']!r} in the benchmark runner")


def torch_artifact(shape: dict, precision: str) -> dict:
    from edgevlm.benchmarks.flops import llm_params, vision_cost

    bpe = 4 if precision == "fp32" else 2
    p = llm_params(shape["llm"])
    vis = vision_cost(shape["vision"])["params"] + shape["integrator"]["params"]
    return {"artifact_mb": {"llm": round((p["layers"] + p["head"] + p["embed"]) * bpe / 2**20, 1),
                            "vision": round(vis * bpe / 2**20, 1)},
            "decode_weight_bytes": (p["layers"] + (p["head"] or p["embed"])) * bpe,
            "kv_bits": 32 if precision == "fp32" else 16, "vision_precision": precision}


def bundle_facts(bundle: Path, case: dict) -> dict:
    """Artifact sizes per role and the LLM bytes a decode step reads, from the bundle itself."""
    from edgevlm.runtime.manifest import read_manifest

    m = read_manifest(bundle, verify=False)
    sizes: dict[str, float] = {}
    for f in m.files:
        role = f.role.removesuffix("_data")
        sizes[role] = sizes.get(role, 0) + (bundle / f.path).stat().st_size / 2**20
    facts: dict[str, Any] = {"artifact_mb": {k: round(v, 2) for k, v in sizes.items()}}
    if m.target == "gguf":
        llm = bundle / m.target_info.llm[case["precision"]]
        facts["decode_weight_bytes"] = gguf_read_bytes(llm)
        facts.update(kv_bits=16, vision_precision="f16")
    elif m.target == "onnx":
        facts["decode_weight_bytes"] = sum((bundle / f.path).stat().st_size for f in m.files
                                           if f.role in ("decoder", "decoder_data"))
        facts.update(kv_bits=16 if case["precision"] == "fp16" else 32,
                     vision_precision=onnx_vision_precision(case["export"]))
    elif m.target == "executorch":  # one .pte: the decoder's weights dominate it
        facts["decode_weight_bytes"] = (bundle / m.target_info.pte).stat().st_size
        facts.update(kv_bits=32, vision_precision="fp32")
    return facts


def onnx_vision_precision(spec: dict) -> str:
    """The vision graph's precision in an ONNX export ``spec``: int8 when quantised (int8 or int4,
    any int8 format), else the dtype."""
    return "int8" if spec["quantize"] in ("int8", "int4") else spec["dtype"]


def gguf_read_bytes(path: Path) -> int:
    """Bytes of every LLM tensor a decode step reads (the embedding table is only gathered)."""
    from gguf import GGUFReader

    return int(sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors if t.name != "token_embd.weight"))


# --- measure -------------------------------------------------------------------------------------


def open_runtime(case: dict, prepared: dict):
    """(Runtime, torch model or None) for an edgevlm case; the runtime maps ``threads`` onto each backend."""
    from edgevlm.runtime.engine import Runtime

    backend, threads, acc = case["backend"], threads_of(case), accelerator(case)
    if backend == "torch":
        from edgevlm.model.torch_backend import torch_runtime

        model = load_torch_model(case, case["precision"], acc)
        return torch_runtime(model, threads=threads), model
    options = {"ort": {"providers": "cuda" if acc == "cuda" else "cpu"},
               "llamacpp": {"quant": case["precision"], "n_gpu_layers": -1 if acc == "gpu" else 0}}
    return Runtime.load(prepared["artifact"], backend=backend, threads=threads, **options.get(backend, {})), None


def measure_edgevlm(case: dict, prepared: dict) -> dict:
    from edgevlm.runtime.generate import GenerationConfig, generate

    rt, model = open_runtime(case, prepared)
    rss_loaded = current_rss_mb()
    wl = case["workload"]
    question = filler_question(rt.tokenizer.encode, wl["prompt_tokens"])
    n_img = wl["images"]
    ids = rt.prompt_ids(image_prompt(question, n_img), with_image=n_img > 0)
    pixels = np.concatenate([rt.pixel_values(bench_image(case["seed"] + i)) for i in range(n_img)]) if n_img else None
    cfg = GenerationConfig(max_new_tokens=wl["new_tokens"], ignore_eos=True, seed=case["seed"])
    last: dict = {}

    def run_once() -> dict:
        r = generate(rt.backend, rt.tokenizer, ids, pixels, cfg)
        t = r.timings.to_dict()
        t["prefill_tok_s"] = (t["n_visual_tokens"] + t["n_prompt_tokens"]) / max(t["prefill_ms"], 1e-9) * 1e3
        if model is not None and pixels is not None:
            t.update(split_vision(model, pixels))
        last.update(t, token_ids=r.token_ids)
        return t

    runs = timed_runs(case, run_once)
    out = {"metrics": collect_metrics(runs), "rss_loaded_mb": rss_loaded, "peak_rss_mb": peak_rss_mb(),
           "gpu_peak_mb": torch_gpu_peak_mb() if model is not None else None,
           "n_visual_tokens": last["n_visual_tokens"], "n_prompt_tokens": last["n_prompt_tokens"],
           "n_generated": last["n_generated"], "token_ids_head": last["token_ids"][:8],
           "threads_effective": threads_of(case), "accelerator": accelerator(case)}
    if case.get("eval"):
        out["accuracy"] = held_out_accuracy(rt, case["eval"])
    rt.close()
    return out


def split_vision(model, pixels: np.ndarray) -> dict:
    """Vision tower and integrator timed apart (torch only: other backends fuse them in one graph)."""
    import torch

    px = torch.from_numpy(pixels).to(model.device)
    with torch.inference_mode():
        t0 = time.perf_counter()
        feats = model.vision_tower(px)
        t1 = time.perf_counter()
        feats = feats.to(next(model.integrator.parameters(), feats).dtype)
        model.integrator(feats)
        if model.in_llm:  # vlora's weight generators / gated_prefix's projection are per-image work too
            model.integrator.image_weights(feats)
        t2 = time.perf_counter()
    return {"tower_ms": (t1 - t0) * 1e3, "integrator_ms": (t2 - t1) * 1e3}


def torch_gpu_peak_mb() -> float | None:
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def held_out_accuracy(rt, spec: dict) -> dict:
    """Exact-match accuracy on a held-out split through this very backend (train/evaluate.py's scorer)."""
    from edgevlm.train.data.llava import load_llava_records, load_record_image
    from edgevlm.train.evaluate import majority_answers, score

    data = Path(spec["data"])
    split = spec.get("split", "test")
    if not (data / f"{split}.json").is_file():
        raise EdgeVLMError(f"eval data {data / (split + '.json')} not found (python train/make_data.py --out {data})")
    records = load_llava_records(str(data / f"{split}.json")).records[: int(spec.get("max_records", 0)) or None]
    basis_file = data / "train.json"
    basis = load_llava_records(str(basis_file)).records if basis_file.is_file() else records
    answer = lambda rec, q: rt.generate(load_record_image(rec), q, max_new_tokens=12).text  # noqa: E731
    t = time.perf_counter()
    result = score(records, answer, majority_answers(basis), progress=False)
    return {"split": split, "n": result["overall"]["n"], "accuracy": result["overall"]["accuracy"],
            "majority_baseline": result["overall"]["majority_baseline"], "eval_s": round(time.perf_counter() - t, 1),
            "per_type": {k: v["accuracy"] for k, v in result["per_type"].items()}}


def measure(case: dict, prepared: dict) -> dict:
    from edgevlm.benchmarks.environment import NvidiaMemorySampler, TegraMemorySampler

    with TegraMemorySampler() as tegra, NvidiaMemorySampler() as nvidia:  # no-ops without tegrastats/nvidia-smi
        if case["kind"] == "peer":
            from edgevlm.benchmarks import peers

            out = peers.MEASURE[case["backend"]](case, prepared)
        elif case.get("task") == "fidelity":
            from edgevlm.benchmarks.fidelity import measure_fidelity

            out = measure_fidelity(case, prepared)
        else:
            out = measure_edgevlm(case, prepared)
    if (mem := tegra.result()) is not None:
        out["tegra_memory"] = mem
    if out.get("gpu_peak_mb") is None and (gpu := nvidia.peak_mb()) is not None:
        out["gpu_peak_mb"] = gpu  # process GPU memory seen by nvidia-smi (ort / llama.cpp on CUDA)
    return out


# --- entry point ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one benchmark case (run by benchmarks/run.py)")
    p.add_argument("step", choices=("prepare", "measure"))
    p.add_argument("--case", required=True, help="case JSON (with 'prepared' for measure)")
    p.add_argument("--out", required=True, help="result JSON to write")
    args = p.parse_args(argv)
    case = json.loads(Path(args.case).read_text())
    t = time.perf_counter()
    try:
        result = prepare(case) if args.step == "prepare" else measure(case, case.get("prepared") or {})
        result["status"] = "ok"
        rc = 0
    except EdgeVLMError as e:
        result, rc = {"status": "failed", "error": f"{type(e).__name__}: {e}"}, 2
    except Exception as e:  # noqa: BLE001 - a failed case is data; the traceback goes with it
        result, rc = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                      "traceback": traceback.format_exc()[-4000:]}, 1
    result["step_s"] = round(time.perf_counter() - t, 2)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, default=_json_default))
    shutil.move(str(tmp), args.out)
    sys.stdout.flush()
    return rc


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)


if __name__ == "__main__":
    raise SystemExit(main())
