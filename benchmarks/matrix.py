"""A benchmark matrix (YAML) -> the list of cases to run.

    name: smoke
    defaults: {images: 1, prompt_tokens: 16, new_tokens: 8, threads: 1, warmup: 1, runs: 3, timeout_s: 300}
    models:
      - preset: tiny                       # or  dir: runs/tiny/final  (+ eval: {data, split, max_records})
        overrides: {llm__num_hidden_layers: 2}
        integrators: [ldpv2]               # "all" = every registered integrator; default: the model's own
        backends: [torch, llamacpp]        # optional: only these of the matrix's backends/peers
    backends: {torch: [fp32], ort: [fp32, int8], llamacpp: [q4_k_m]}   # backend -> precisions
    peers: {hf_eager: [fp32], llamacpp_raw: [q4_k_m]}

A ``fidelity: {prompts: 8, steps: 16}`` section makes every case a fidelity case instead (KL divergence
and same-top-token rate against PyTorch fp32, ``benchmarks/fidelity.py``): one per model x integrator x
backend x precision, no peers, no workload axes.

Any workload key (images, prompt_tokens, new_tokens, threads) may be a list; cases are the product
model x integrator x backend x precision x workload. Each case has a stable ``id`` (resume key) and
an ``export`` spec (what bundle it needs; cached by content hash in ``case.py``). Cases whose
backend is not installed, or whose integrator the target cannot represent, come out with a
``skip`` reason instead of being dropped, so the report can say what was not measured and why.
"""
from __future__ import annotations

import importlib.util
import os
import itertools
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from edgevlm.runtime.errors import EdgeVLMError

BACKEND_PRECISIONS: dict[str, tuple[str, ...]] = {
    "torch": ("fp32", "bf16", "fp16"),
    # _vnni / _reduce-range: the int8 parts (vision graph, int8 decoder) in export's vnni (u8 x s8;
    # accurate with VNNI/AMX and on Arm) or reduce-range (u8 x s7; every CPU) format; both run ONNX
    # Runtime's u8 x s8 kernels (see export's --int8-target)
    "ort": ("fp32", "fp16", "int8", "int4", "int8_vnni", "int4_vnni", "int8_reduce-range", "int4_reduce-range"),
    "llamacpp": ("f16", "q8_0", "q5_k_m", "q4_k_m", "q4_0"),
    "trt": ("fp16", "int8"),
    "executorch": ("fp32", "8da4w", "int8"),  # export/to_executorch.py --quantize (the text decoder)
}
PEERS: dict[str, tuple[str, ...]] = {
    "hf_eager": ("fp32", "bf16"),  # Hugging Face generate() on the same weights (MobileVLM's path)
    "llamacpp_raw": BACKEND_PRECISIONS["llamacpp"],  # llama-cpp-python low level on the same GGUF
}
# What a backend needs installed: Python modules (libraries, the runtime backend, the exporter).
REQUIREMENTS: dict[str, tuple[str, ...]] = {
    "torch": ("torch", "transformers"),
    "hf_eager": ("torch", "transformers"),
    "ort": ("onnxruntime", "edgevlm.runtime.backends.ort", "edgevlm.export.to_onnx"),
    "llamacpp": ("llama_cpp", "edgevlm.runtime.backends.llamacpp", "edgevlm.export.to_gguf"),
    "llamacpp_raw": ("llama_cpp", "edgevlm.export.to_gguf"),
    "trt": ("tensorrt", "edgevlm.runtime.backends.trt", "edgevlm.export.to_trt"),
    "executorch": ("executorch", "edgevlm.runtime.backends.executorch", "edgevlm.export.to_executorch"),
}
WORKLOAD_KEYS = ("images", "prompt_tokens", "new_tokens", "threads")
DEFAULTS: dict[str, Any] = {"images": 1, "prompt_tokens": 32, "new_tokens": 32, "threads": 0, "warmup": 1,
                            "runs": 5, "seed": 0, "timeout_s": 900, "export_timeout_s": 3600,
                            "accelerator": "auto"}  # auto: a GPU where the backend can use one; cpu: never
MATRICES_DIR = Path(__file__).resolve().parent / "matrices"


def resolve_matrix_path(name_or_path: str) -> Path:
    """A path, or the name of a shipped matrix (``smoke`` -> benchmarks/matrices/smoke.yaml)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = MATRICES_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    raise EdgeVLMError(f"matrix {name_or_path!r} not found (a YAML path or one of: {', '.join(shipped_matrices())})")


def shipped_matrices() -> list[str]:
    """Names of the matrices in benchmarks/matrices/."""
    return sorted(f.stem for f in MATRICES_DIR.glob("*.yaml"))


def load_matrix(name_or_path: str) -> dict:
    path = resolve_matrix_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise EdgeVLMError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict) or not data.get("models"):
        raise EdgeVLMError(f"{path}: a matrix needs a 'models' list (see benchmarks/matrix.py)")
    unknown = set(data) - {"name", "description", "defaults", "models", "backends", "peers", "fidelity",
                           *WORKLOAD_KEYS}
    if unknown:
        raise EdgeVLMError(f"{path}: unknown matrix keys {sorted(unknown)}")
    data.setdefault("name", path.stem)
    data["path"] = str(path)
    return data


def expand(matrix: dict, base_dir: Path | None = None) -> list[dict]:
    """Every case of the matrix, in a stable order."""
    defaults = {**DEFAULTS, **(matrix.get("defaults") or {})}
    workload_axes = {k: _as_list(matrix.get(k, defaults[k])) for k in WORKLOAD_KEYS}
    targets = [("edgevlm", b, p) for b, p in _target_list(matrix.get("backends") or {}, BACKEND_PRECISIONS)]
    targets += [("peer", b, p) for b, p in _target_list(matrix.get("peers") or {}, PEERS)]
    if not targets:
        raise EdgeVLMError("the matrix names no backends and no peers")
    fidelity = _fidelity_spec(matrix)
    if fidelity is not None:
        if any(kind == "peer" for kind, _, _ in targets):
            raise EdgeVLMError("a fidelity matrix compares edgevlm targets with PyTorch fp32; drop its 'peers'")
        workload_axes = {"images": [1], "prompt_tokens": [0], "new_tokens": [fidelity["steps"]],
                         "threads": _as_list(defaults["threads"])[:1]}
    cases = []
    for spec in matrix["models"]:
        model = _model_entry(spec, base_dir)
        only = spec.get("backends")  # a model may restrict the matrix's backends/peers by name
        for integrator in _integrators(spec, model):
            for kind, backend, precision in targets:
                if only is not None and backend not in only:
                    continue
                for values in itertools.product(*workload_axes.values()):
                    workload = dict(zip(workload_axes, values))
                    cases.append(_case(model, integrator, kind, backend, precision, workload, defaults, fidelity))
    ids = [c["id"] for c in cases]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise EdgeVLMError(f"duplicate case ids {dup[:3]}: give models distinct 'label's")
    return cases


def _fidelity_spec(matrix: dict) -> dict | None:
    """The matrix's ``fidelity`` section with defaults filled in (None: a latency matrix)."""
    from edgevlm.benchmarks.fidelity import DEFAULTS as FIDELITY_DEFAULTS

    spec = matrix.get("fidelity")
    if spec is None or spec is False:
        return None
    spec = {} if spec is True else spec
    if not isinstance(spec, dict) or set(spec) - set(FIDELITY_DEFAULTS):
        raise EdgeVLMError(f"'fidelity' takes {sorted(FIDELITY_DEFAULTS)} (or true), got {spec!r}")
    out = {**FIDELITY_DEFAULTS, **spec}
    for k, v in out.items():
        if not isinstance(v, int) or v < 1:
            raise EdgeVLMError(f"fidelity.{k} must be a positive integer, got {v!r}")
    return out


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _target_list(section, table: dict[str, tuple[str, ...]]) -> list[tuple[str, str]]:
    if isinstance(section, list):  # shorthand: names only -> first precision of each
        section = {name: [table.get(name, ("?",))[0]] for name in section}
    out = []
    for name, precisions in section.items():
        if name not in table:
            raise EdgeVLMError(f"unknown backend/peer {name!r}; valid: {', '.join(table)}")
        for p in _as_list(precisions or [table[name][0]]):
            if str(p).lower() not in table[name]:
                raise EdgeVLMError(f"{name}: unknown precision {p!r}; valid: {', '.join(table[name])}")
            out.append((name, str(p).lower()))
    return out


def _model_entry(spec: dict, base_dir: Path | None) -> dict:
    if "preset" in spec:
        model = {"source": "preset", "name": spec["preset"], "overrides": dict(spec.get("overrides") or {})}
        model["label"] = spec.get("label", spec["preset"] + ("-small" if model["overrides"] else ""))
    elif "dir" in spec:
        path = Path(spec["dir"])
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        model = {"source": "dir", "path": str(path), "overrides": {}, "label": spec.get("label", path.name)}
        model["missing"] = not path.is_dir()
    else:
        raise EdgeVLMError(f"a matrix model needs 'preset' or 'dir': {spec}")
    model["eval"] = spec.get("eval")
    model["optional"] = bool(spec.get("optional", False))
    return model


def _integrators(spec: dict, model: dict) -> list[str | None]:
    wanted = spec.get("integrators")
    if wanted is None:
        return [None]  # the model's own
    if model["source"] == "dir":
        raise EdgeVLMError(f"{model['path']}: 'integrators' applies to presets (a trained dir has its own)")
    if wanted == "all":
        from edgevlm.model.integrators import INTEGRATORS

        return list(INTEGRATORS.names())
    return [str(w) for w in _as_list(wanted)]


def export_spec(backend: str, precision: str) -> dict | None:
    """The bundle a case needs (None: the torch model itself)."""
    if backend in ("torch", "hf_eager"):
        return None
    if backend == "ort":
        base, _, int8_target = precision.partition("_")  # int4_vnni: int4, vnni int8 format
        if base == "fp16":
            return {"target": "onnx", "dtype": "fp16", "quantize": "none"}
        spec = {"target": "onnx", "dtype": "fp32", "quantize": "none" if base == "fp32" else base}
        return {**spec, "int8_target": int8_target} if int8_target else spec
    if backend in ("llamacpp", "llamacpp_raw"):
        return {"target": "gguf", "quants": [precision]}
    if backend == "executorch":
        return {"target": "executorch", "quantize": precision}
    return {"target": backend, "precision": precision}


def _case(model: dict, integrator: str | None, kind: str, backend: str, precision: str, workload: dict,
          defaults: dict, fidelity: dict | None = None) -> dict:
    w = workload
    integ = integrator or "own"
    tail = (f"fidelity-n{fidelity['prompts']}-s{fidelity['steps']}" if fidelity else
            f"t{w['threads']}-i{w['images']}-p{w['prompt_tokens']}-n{w['new_tokens']}")
    case = {"id": f"{model['label']}/{integ}/{backend}/{precision}/{tail}",
            "task": "fidelity" if fidelity else "latency", "fidelity": fidelity, "kind": kind, "backend": backend,
            "precision": precision,
            "model": {k: v for k, v in model.items() if k not in ("eval", "missing", "optional")},
            "integrator": integrator, "workload": dict(w), "export": export_spec(backend, precision),
            "eval": model["eval"] if kind == "edgevlm" else None,
            **{k: defaults[k] for k in ("warmup", "runs", "seed", "timeout_s", "export_timeout_s", "accelerator")}}
    case["skip"] = skip_reason(case, model)
    return case


def skip_reason(case: dict, model: dict) -> str | None:
    """Why a case cannot run here (None: it can)."""
    if case["task"] == "fidelity" and (case["backend"], case["precision"]) == ("torch", "fp32"):
        return "torch fp32 is the fidelity reference itself"
    if model.get("missing"):
        return f"model dir {model['path']} does not exist" + (" (optional; run `make demo` first)"
                                                               if model.get("optional") else "")
    missing = [m for m in REQUIREMENTS.get(case["backend"], ()) if not _module_present(m)]
    if missing:
        return f"{case['backend']} not installed here (missing {', '.join(missing)})"
    if case["backend"] == "trt" and not Path("/dev/nvidia0").exists():
        return "TensorRT needs a CUDA GPU"
    reason = _export_refusal(case)
    if reason:
        return reason
    if case["backend"] in ("llamacpp", "llamacpp_raw") and case["integrator"]:
        from edgevlm.export.gguf_mmproj import gguf_projectors

        if case["integrator"] not in gguf_projectors():
            return f"integrator {case['integrator']!r} has no llama.cpp projector type"
    return None


def _export_refusal(case: dict) -> str | None:
    """The integrator's declared reason why the case's export target cannot hold it (None: it can)."""
    from edgevlm.model.integrators import EXPORT_TARGETS, INTEGRATORS, export_refusal

    name, spec = case["integrator"], case["export"]
    if not name or not spec or name not in INTEGRATORS:
        return None
    target = spec["target"]
    reason = export_refusal(name, target) if target in EXPORT_TARGETS else None
    return f"integrator {name!r} cannot be exported to {target}: {reason}" if reason else None


def _module_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def select(cases: list[dict], patterns: list[str] | None) -> list[dict]:
    """Cases whose id contains every pattern (``--filter``); a pattern starting with ``!`` excludes."""
    if not patterns:
        return cases
    keep = []
    for c in cases:
        ok = all((p[1:] not in c["id"]) if p.startswith("!") else (p in c["id"]) for p in patterns)
        if ok:
            keep.append(c)
    return keep


# --- the workload a case runs: a fixed image and a question of a given token length ------------

FILLER = ("Please look at the picture carefully and describe every shape, its colour, its size, where it "
          "is placed relative to the others, and any text that is written on it")
def bench_image(seed: int, size: int = 336):
    """A deterministic RGB test image: smooth gradients, a few blocks of colour, mild noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.stack([x, y, (x + y) / 2], -1) * 180 + 40  # [S, S, 3]
    for _ in range(4):
        x0, y0 = rng.integers(0, size - 80, 2)
        img[y0:y0 + 60, x0:x0 + 60] = rng.integers(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def filler_question(encode: Callable[[str], list[int]], n_tokens: int) -> str:
    """A question of about ``n_tokens`` tokens (at least that many, cut at a word)."""
    words = FILLER.split()
    out: list[str] = []
    while len(encode(" ".join(out))) < n_tokens:
        out.append(words[len(out) % len(words)])
    return " ".join(out) or "Describe."


def image_prompt(question: str, n_images: int) -> str:
    return "".join("<image>\n" for _ in range(n_images)) + question


# --- export cache keys -------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
# Code whose changes change an export or a recorded reference: exporters, the runtime (templates,
# preprocessing, graph names, manifest), model definition and init, the held-out prompts.
EXPORT_CODE = ("export", "runtime", "model", "train/data/shapes.py",
               "train/data/shapes_questions.py")


def cache_root() -> Path:
    return Path(os.environ.get("EDGEVLM_CACHE", Path.home() / ".cache" / "edgevlm")) / "bench-exports"


def export_key(case: dict) -> str | None:
    """Content hash of everything an export depends on (None: the case needs no export)."""
    return None if case["export"] is None else content_key(case, export=case["export"])


def content_key(case: dict, **extra) -> str:
    """Hash of the case's model (preset and overrides, or the dir's files), integrator, the model and
    export code, and ``extra``: the key of anything cached that is a function of these."""
    import hashlib
    import json

    from edgevlm import __version__

    payload = {"model": _model_fingerprint(case["model"]), "integrator": case["integrator"],
               "edgevlm": __version__, "code": _code_digest(), **extra}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _model_fingerprint(model: dict) -> dict:
    if model["source"] == "preset":
        return {"preset": model["name"], "overrides": model.get("overrides") or {}}
    return {"dir": _tree_digest(Path(model["path"]))}


def _code_digest() -> str:
    files = []
    for rel in EXPORT_CODE:
        p = REPO / rel
        files += sorted(p.rglob("*.py")) if p.is_dir() else ([p] if p.is_file() else [])
    return _files_digest([f for f in files if "__pycache__" not in f.parts], REPO)


def _tree_digest(root: Path) -> str:
    return _files_digest(sorted(f for f in root.rglob("*") if f.is_file()), root) if root.is_dir() else "missing"


def _files_digest(files: list[Path], root: Path) -> str:
    """sha256 over (relative path, content sha256) of every file; contents memoised per path by
    (size, mtime), so a big model dir is read once until it changes."""
    import hashlib
    import json

    memo_path = cache_root() / ".file-hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    h = hashlib.sha256()
    changed = False
    for f in files:
        st, key = f.stat(), str(f.resolve())
        if memo.get(key, [None, None, None])[:2] != [st.st_size, st.st_mtime_ns]:
            memo[key] = [st.st_size, st.st_mtime_ns, _sha256(f)]
            changed = True
        h.update(f"{f.relative_to(root)}\0{memo[key][2]}\n".encode())
    if changed:
        memo = {k: v for k, v in memo.items() if Path(k).exists()}  # forget deleted files
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_path)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()
