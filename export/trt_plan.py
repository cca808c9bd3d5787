"""The TensorRT build plan, from an ONNX bundle's manifest: which engines, with which optimisation
profiles and builder flags, and the equivalent ``trtexec`` command lines. Pure Python: no TensorRT,
no CUDA (``--dry-run`` and the no-TensorRT message print it anywhere).

Profiles. Every dynamic input dimension has a *role*, known from the graph's input names
(``past_key_values.*`` is [batch, kv_heads, past, head_dim], ...), and each profile gives each role
a (min, opt, max) range:

    vision_encoder  one profile      batch 1..max_batch (fixed at max_batch on DLA: no dynamic shapes)
    embed_tokens    one profile      batch 1, seq 1..max_seq
    decoder         profile 0 prefill  seq 1..max_seq, past 0 (an empty cache), total = seq
                    profile 1 decode   seq 1, past 1..max_seq-1, total 2..max_seq

so the decode kernels are tuned for one token against a cache, not for a long prompt.
Fixed dimensions come from the graph (the manifest's ``target_info.graphs``, else the .onnx file).
"""
from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgevlm.runtime.errors import EdgeVLMError
from edgevlm.runtime.graph_io import (
    ATTENTION_MASK, INPUT_IDS, INPUTS_EMBEDS, PAST, PIXEL_VALUES, POSITION_IDS, is_past,
)

PRECISIONS = ("fp32", "fp16", "int8", "fp8")
GRAPHS = ("vision_encoder", "embed_tokens", "decoder")
ENGINE_FILES = {g: f"{g}.engine" for g in GRAPHS}
CALIB_CACHE = "vision_encoder.calib"
TRT_TARGET = "10.3"  # JetPack 6.1 / 6.2; the operator list in data/tensorrt_onnx_ops.yaml is for it

# input name (or prefix ending in ".") -> role of each dimension; None = fixed by the model
ROLES: dict[str, dict[str, tuple[str | None, ...]]] = {
    "vision_encoder": {PIXEL_VALUES: ("batch", None, None, None)},
    "embed_tokens": {INPUT_IDS: ("batch", "seq")},
    "decoder": {INPUTS_EMBEDS: ("batch", "seq", None), ATTENTION_MASK: ("batch", "total"),
                POSITION_IDS: ("batch", "seq"), f"{PAST}.": ("batch", None, "past", None)},
}
TRTEXEC_FLAGS = {"FP16": "--fp16", "INT8": "--int8", "FP8": "--fp8", "GPU_FALLBACK": "--allowGPUFallback"}


@dataclass
class ShapeRange:
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass
class Profile:
    name: str
    shapes: dict[str, ShapeRange]  # only inputs with a dynamic dimension


@dataclass
class EnginePlan:
    graph: str
    onnx: str  # path inside the ONNX bundle
    engine: str  # file name inside the TensorRT bundle
    flags: list[str]  # trt.BuilderFlag names to set
    clear_flags: list[str]  # trt.BuilderFlag names to clear (TF32 for a true fp32 build)
    profiles: list[Profile]
    int8: str | None = None  # None | "calibrate" (entropy calibration on images) | "qdq" (the graph's own)
    dla_core: int | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class BuildPlan:
    bundle: str
    out: str
    precision: str
    max_batch: int
    max_seq: int
    workspace_gb: float
    timing_cache: str | None
    dla_core: int | None
    engines: list[EnginePlan]
    tensorrt_target: str = TRT_TARGET

    def engine(self, graph: str) -> EnginePlan:
        return next(e for e in self.engines if e.graph == graph)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- shapes ---------------------------------------------------------------------------------------


def dim_roles(graph: str, name: str) -> tuple[str | None, ...] | None:
    table = ROLES[graph]
    if name in table:
        return table[name]
    return next((r for k, r in table.items() if k.endswith(".") and name.startswith(k)), None)


def role_ranges(graph: str, n_visual: int, max_batch: int, max_seq: int, dla: bool) -> dict[str, dict]:
    """profile name -> role -> (min, opt, max)."""
    opt_prefill = min(max_seq, n_visual + 64)  # an image and a short question
    if graph == "vision_encoder":
        batch = (max_batch,) * 3 if dla else (1, 1, max_batch)
        return {"vision": {"batch": batch}}
    if graph == "embed_tokens":
        return {"tokens": {"batch": (1, 1, 1), "seq": (1, opt_prefill, max_seq)}}
    opt_past = min(max_seq - 1, n_visual + 96)
    return {"prefill": {"batch": (1, 1, 1), "seq": (1, opt_prefill, max_seq), "past": (0, 0, 0),
                        "total": (1, opt_prefill, max_seq)},
            "decode": {"batch": (1, 1, 1), "seq": (1, 1, 1), "past": (1, opt_past, max_seq - 1),
                       "total": (2, opt_past + 1, max_seq)}}


def shape_range(graph: str, name: str, dims: list, ranges: dict) -> ShapeRange | None:
    """The (min, opt, max) shape of one input, or None when it has no dynamic dimension."""
    if all(isinstance(d, int) and d > 0 for d in dims):
        return None
    roles = dim_roles(graph, name)
    if roles is None or len(roles) != len(dims):
        raise EdgeVLMError(f"{graph} input {name} {dims}: not an input edgevlm knows how to shape "
                           "(re-export the bundle with this edgevlm)")
    out: list[list[int]] = [[], [], []]
    for i, (d, role) in enumerate(zip(dims, roles)):
        if isinstance(d, int) and d > 0:
            lo = hi = opt = d
        elif role is None or role not in ranges:
            raise EdgeVLMError(f"{graph} input {name}: dimension {i} ({d!r}) is dynamic but should be fixed")
        else:
            lo, opt, hi = ranges[role]
        for k, v in enumerate((lo, opt, hi)):
            out[k].append(v)
    return ShapeRange(*(tuple(s) for s in out))


def graph_inputs(root: Path, manifest, graph: str) -> dict[str, list]:
    """Input name -> dims (int or symbolic name), from the manifest or else the .onnx file."""
    recorded = manifest.target_info.graphs.get(graph)
    if recorded and recorded.inputs:
        return {k: list(v) for k, v in recorded.inputs.items()}
    import onnx

    g = onnx.load(str(Path(root) / manifest.file(graph).path), load_external_data=False).graph
    inits = {t.name for t in g.initializer}
    return {i.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                     for d in i.type.tensor_type.shape.dim] for i in g.input if i.name not in inits}


def profiles_for(graph: str, inputs: dict[str, list], ranges: dict[str, dict]) -> list[Profile]:
    out = []
    for pname, roles in ranges.items():
        shapes = {n: r for n, dims in inputs.items() if (r := shape_range(graph, n, dims, roles)) is not None}
        out.append(Profile(pname, shapes))
    return out


# --- the plan -------------------------------------------------------------------------------------


def check_options(precision: str, max_batch: int, max_seq: int, workspace_gb: float, dla_core: int | None,
                  model) -> None:
    if precision not in PRECISIONS:
        raise EdgeVLMError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if max_batch < 1:
        raise EdgeVLMError(f"--max-batch must be >= 1, got {max_batch}")
    if not model.n_visual_tokens + 2 <= max_seq <= model.max_positions:
        raise EdgeVLMError(f"--max-seq must be between {model.n_visual_tokens + 2} (the image's "
                           f"{model.n_visual_tokens} visual tokens + a token + an answer) and the model's "
                           f"{model.max_positions} positions, got {max_seq}")
    if workspace_gb <= 0:
        raise EdgeVLMError(f"--workspace-gb must be > 0, got {workspace_gb}")
    if dla_core is not None:
        if dla_core < 0:
            raise EdgeVLMError(f"--dla-core must be >= 0, got {dla_core}")
        if precision not in ("fp16", "int8"):
            raise EdgeVLMError(f"--dla-core needs --precision fp16 or int8 (DLA runs no {precision}); "
                               f"got {precision}")


def _flags(graph: str, precision: str, quant: str | None) -> tuple[list[str], list[str], str | None]:
    """(flags, cleared flags, int8 mode) of one engine."""
    if precision == "fp32":
        return [], ["TF32"], None  # fp32 means fp32: no TF32 matmuls
    if precision == "fp16":
        return ["FP16"], [], None
    if precision == "int8":
        if quant in ("int8", "int4"):
            return ["FP16", "INT8"], [], "qdq"
        if graph == "vision_encoder":
            return ["FP16", "INT8"], [], "calibrate"
        return ["FP16"], [], None
    return (["FP16", "FP8"] if quant == "fp8" else ["FP16"]), [], None


def make_plan(bundle: str | Path, manifest, out: str | Path, precision: str = "fp16", max_batch: int = 1,
              max_seq: int | None = None, workspace_gb: float = 2.0, timing_cache: str | None = None,
              dla_core: int | None = None, quant: dict[str, str | None] | None = None) -> BuildPlan:
    """The plan for an ONNX bundle; ``quant`` is each graph's explicit quantisation
    (``trt_ops.quantization_kind``: None, "int8", "fp8", ...)."""
    if manifest.target != "onnx":
        raise EdgeVLMError(f"{bundle}: a {manifest.target!r} bundle; TensorRT engines are built from an "
                           "ONNX bundle (python export/to_onnx.py)")
    model = manifest.model
    max_seq = model.max_positions if max_seq is None else max_seq
    check_options(precision, max_batch, max_seq, workspace_gb, dla_core, model)
    quant = quant or {}
    if precision == "fp8" and "fp8" not in quant.values():
        raise EdgeVLMError("--precision fp8 needs graphs with FP8 Q/DQ nodes (TensorRT has no FP8 calibration; "
                           "quantise with NVIDIA's TensorRT Model Optimizer); this bundle has none. FP8 also "
                           "needs an SM 8.9+ GPU (Ada, Hopper), which Jetson Orin (SM 8.7) is not")
    engines = []
    for graph in GRAPHS:
        dla = dla_core is not None and graph == "vision_encoder"
        ranges = role_ranges(graph, model.n_visual_tokens, max_batch, max_seq, dla)
        flags, cleared, int8 = _flags(graph, precision, quant.get(graph))
        if dla:
            flags = [*flags, "GPU_FALLBACK"]
        engines.append(EnginePlan(graph, manifest.file(graph).path, ENGINE_FILES[graph], flags, cleared,
                                  profiles_for(graph, graph_inputs(Path(bundle), manifest, graph), ranges),
                                  int8, dla_core if dla else None, _notes(graph, precision, int8, dla, manifest)))
    return BuildPlan(str(bundle), str(out), precision, max_batch, max_seq, workspace_gb, timing_cache,
                     dla_core, engines)


def _notes(graph: str, precision: str, int8: str | None, dla: bool, manifest) -> list[str]:
    notes = []
    if int8 == "calibrate":
        notes.append("int8: entropy calibration on dataset images (IInt8EntropyCalibrator2); the cache is "
                     f"kept as {CALIB_CACHE}")
    if precision == "int8" and graph == "decoder" and int8 is None:
        notes.append("int8 applies to the vision engine; the decoder runs fp16 (int8/int4 LLM weights in "
                     "TensorRT need an explicitly quantised Q/DQ decoder)")
    if dla:
        notes.append("DLA: layers DLA cannot run fall back to the GPU; DLA needs static shapes, so the "
                     "batch is fixed (the runtime pads)")
    if graph == "decoder" and precision != "fp32" and manifest.target_info.dtype == "fp32":
        notes.append("inputs/outputs (KV cache included) stay fp32 as in the ONNX bundle; an ONNX bundle "
                     "exported with --dtype fp16 halves the KV cache")
    return notes


# --- trtexec and the printed plan -----------------------------------------------------------------


def dims_str(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def _shapes_arg(profile: Profile, which: str) -> str:
    return ",".join(f"{name}:{dims_str(getattr(r, which))}" for name, r in profile.shapes.items())


def trtexec_command(plan: BuildPlan, engine: EnginePlan) -> list[str]:
    """The ``trtexec`` (TensorRT 10) command line that builds the same engine."""
    cmd = ["trtexec", f"--onnx={Path(plan.bundle) / engine.onnx}", f"--saveEngine={Path(plan.out) / engine.engine}"]
    multi = len(engine.profiles) > 1
    for i, p in enumerate(engine.profiles):
        if not p.shapes:
            continue
        if multi:
            cmd.append(f"--profile={i}")
        cmd += [f"--{w}Shapes={_shapes_arg(p, w)}" for w in ("min", "opt", "max")]
    cmd += [TRTEXEC_FLAGS[f] for f in engine.flags if f != "GPU_FALLBACK"]
    if "TF32" in engine.clear_flags:
        cmd.append("--noTF32")
    if engine.int8 == "calibrate":
        cmd.append(f"--calib={Path(plan.out) / CALIB_CACHE}")
    cmd.append(f"--memPoolSize=workspace:{int(plan.workspace_gb * 1024)}")  # MiB
    if plan.timing_cache:
        cmd.append(f"--timingCacheFile={plan.timing_cache}")
    if engine.dla_core is not None:
        cmd += [f"--useDLACore={engine.dla_core}", "--allowGPUFallback"]
    cmd.append("--skipInference")
    return cmd


def trtexec_lines(plan: BuildPlan) -> list[str]:
    return [shlex.join(trtexec_command(plan, e)) for e in plan.engines]


def _group(shapes: dict[str, ShapeRange]) -> list[tuple[str, ShapeRange]]:
    """past_key_values.{i}.key/value with identical ranges shown as one row."""
    rows: list[tuple[str, ShapeRange]] = []
    kv = [(n, r) for n, r in shapes.items() if is_past(n)]
    rows += [(n, r) for n, r in shapes.items() if not is_past(n)]
    if kv and all(r == kv[0][1] for _, r in kv):
        rows.append((f"{PAST}.* ({len(kv)} tensors)", kv[0][1]))
    else:
        rows += kv
    return rows


def format_plan(plan: BuildPlan, manifest, memory: dict[str, int] | None = None) -> str:
    m = manifest.model
    lines = [f"TensorRT build plan (for TensorRT {plan.tensorrt_target}, JetPack 6.1/6.2)",
             f"  bundle     {plan.bundle}  ({manifest.target_info.dtype} ONNX, opset "
             f"{manifest.target_info.opset}; {m.preset or '?'}/{m.integrator or '?'}: {m.n_visual_tokens} "
             f"visual tokens, {m.num_layers} layers, {m.num_kv_heads}x{m.head_dim} KV heads, vocab {m.vocab_size})",
             f"  out        {plan.out}",
             f"  precision  {plan.precision}   max batch {plan.max_batch}   max seq {plan.max_seq}   workspace "
             f"{plan.workspace_gb:g} GiB   timing cache {plan.timing_cache or '-'}   DLA core "
             f"{'-' if plan.dla_core is None else plan.dla_core}"]
    for e in plan.engines:
        where = f"DLA core {e.dla_core} + GPU fallback" if e.dla_core is not None else "GPU"
        flags = ", ".join(e.flags + [f"no {f}" for f in e.clear_flags]) or "fp32"
        lines.append(f"  {e.onnx} -> {e.engine}   [{flags}]  {where}")
        for i, p in enumerate(e.profiles):
            head = f"{f'    profile {i} ({p.name})':<23}"
            for j, (name, r) in enumerate(_group(p.shapes)):
                lines.append(f"{head if j == 0 else ' ' * len(head)}  {name:<34} min {dims_str(r.min):<14} "
                             f"opt {dims_str(r.opt):<14} max {dims_str(r.max)}")
        lines += [f"    note: {n}" for n in e.notes]
    if memory:
        lines.append("  device memory (estimate): " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in memory.items()))
    return "\n".join(lines)


def memory_estimate(manifest, plan: BuildPlan) -> dict[str, int]:
    """Bytes the runtime allocates for its buffers at ``max_seq`` plus the weights (approximate)."""
    m = manifest.model
    io_bytes = 2 if manifest.target_info.dtype == "fp16" else 4
    kv = 2 * 2 * m.num_layers * m.num_kv_heads * plan.max_seq * m.head_dim * io_bytes  # ping-pong x (K, V)
    logits = plan.max_seq * m.vocab_size * io_bytes  # the decoder returns logits for every prefill position
    wbytes = {"fp32": 4, "fp16": 2, "int8": 2, "fp8": 2}[plan.precision]
    weights = sum(m.params.values()) * wbytes
    if plan.precision == "int8":  # the vision engine is int8
        weights -= (m.params.get("vision_tower", 0) + m.params.get("integrator", 0)) * (wbytes - 1)
    return {"weights": weights, "KV cache": kv, "logits": logits}
