"""What a bundle's manifest says about its target: one dataclass per target (``Manifest.target_info``).

The exporter of each target fills in its dataclass; ``read_manifest`` picks the class from the
manifest's ``target`` (``TARGET_INFO``), so every reader gets typed fields, and a missing or
mistyped field is a ``BundleError`` naming it. Reports that only people read (per-graph validation,
engine build facts, Core ML compression details) stay plain mappings inside the typed fields.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union


@dataclass
class TokenCheck:
    """Held-out prompts answered by the finished bundle beside PyTorch at export
    (``runtime.fidelity.summarise`` plus how it was run)."""

    n_sequences: int
    n_positions: int
    kl_mean: float
    kl_median: float
    kl_p99: float
    same_top_token: float
    rms_dp: float
    max_abs_logit_diff: float
    same_greedy_answer: str  # "3/4": sequences whose greedy answers agree everywhere
    vision_cosine_min: float | None = None
    vision_cosine_mean: float | None = None
    steps: int = 0
    prompts: str = ""
    logit_atol: float | None = None  # parity enforced (fp32); None: reported only


# --- ONNX ------------------------------------------------------------------------------------------


@dataclass
class OnnxGraph:
    file: str
    inputs: dict[str, list[Union[str, int]]]  # name -> dims (str: symbolic, int: fixed)
    outputs: dict[str, list[Union[str, int]]]
    variant: str  # fp32 | fp16 | int8_static | int8_dynamic | int4
    validation: dict[str, Any] = field(default_factory=dict)  # the check against PyTorch (a report)
    attention: str = ""  # decoder only: standard | gqa


@dataclass
class KvCache:
    layout: list[str]
    num_layers: int
    in_place: bool  # one buffer [B, H_kv, capacity, Dh] may be bound as both past and present
    dtype: str


@dataclass
class Int8Info:
    target: str  # portable | reduce-range | vnni (export/to_onnx.py --int8-target)
    activation_type: str
    weight_type: str
    reduce_range: bool
    per_channel: bool
    weight_symmetric: bool
    vision_format: str
    decoder_format: str
    accurate_on: str
    note: str = ""


@dataclass
class Int4Info:
    block_size: int
    accuracy_level: int
    symmetric: bool
    op: str


@dataclass
class Calibration:
    source: str
    n_images: int
    method: str
    validation_images: int


@dataclass
class OrtFormat:
    target_platform: str
    optimization_style: str
    config: str  # the reduced-operator config file


@dataclass(kw_only=True)
class OnnxInfo:
    opset: int
    dtype: str  # fp32 | fp16
    quantize: str  # none | int8 | int4
    exporter: str
    decoder_exporter: str
    graphs: dict[str, OnnxGraph]  # vision_encoder, embed_tokens, decoder
    kv_cache: KvCache
    int8: Int8Info | None = None
    int4: Int4Info | None = None
    calibration: Calibration | None = None
    ort_format: OrtFormat | None = None
    trt_refusal: str = ""  # why the integrator cannot become TensorRT engines ("": it can)
    source: str = ""  # the model dir it was exported from ("": a preset)
    export_s: float = 0.0
    token_check: TokenCheck | None = None
    validate: str = "strict"  # strict: every check passed; warn: written anyway (--validate warn)
    failed_checks: list[str] = field(default_factory=list)  # what failed under --validate warn


# --- GGUF ------------------------------------------------------------------------------------------


@dataclass
class LlamaCppUsage:
    """Commands that answer with llama.cpp's own tools as the runtime does (export/gguf_usage.py)."""

    cli: str
    server: str
    request: str  # the chat request body (JSON text)


@dataclass(kw_only=True)
class GgufInfo:
    quant_types: list[str]
    default_quant: str
    llm: dict[str, str]  # quant type -> LLM file
    mmproj: str
    mmproj_type: str
    projector_type: str  # llama.cpp's clip.projector_type
    vision_layers: int
    cls: str  # the class embedding in the mmproj: omit | keep | last
    mmproj_tensors: int
    mm_embd: int
    llm_tensors: int
    tensor_types: dict[str, dict[str, int]]  # quant type -> ggml type -> tensors
    llama_cpp: dict[str, str]  # library versions
    llama_cpp_usage: LlamaCppUsage
    source: str = ""
    token_check: dict[str, TokenCheck] = field(default_factory=dict)  # per quant type


# --- TensorRT --------------------------------------------------------------------------------------


@dataclass
class TrtDevice:
    name: str
    sm: str  # compute capability, "8.7" on Jetson Orin


@dataclass(kw_only=True)
class TrtInfo:
    tensorrt: str  # the TensorRT version the engines were built with
    device: TrtDevice
    precision: str
    source_bundle: str  # the ONNX bundle they were built from
    source_dtype: str
    plan: dict[str, Any] = field(default_factory=dict)  # export/trt_plan.BuildPlan.to_dict()
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)  # graph -> build facts
    op_list: str = ""
    build_s: float = 0.0


# --- Core ML ---------------------------------------------------------------------------------------


@dataclass
class CoremlEmbeddings:
    file: str
    shape: list[int]  # [V, D]
    dtype: str
    order: str
    data_offset: int  # bytes before the raw table (Swift mmaps past the .npy header)


@dataclass(kw_only=True)
class CoremlInfo:
    deployment: dict[str, str]
    weights: str  # fp16 | int8 | int4
    max_context: int
    packages: dict[str, dict[str, Any]]  # role -> path and I/O spec
    compression: dict[str, dict[str, Any]]
    embed_tokens: CoremlEmbeddings
    causal_mask: dict[str, Any]
    kv_cache: dict[str, Any]
    coremltools: str
    validation: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    export_s: float = 0.0


# --- ExecuTorch ------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class ExecutorchInfo:
    """A ``.pte`` for ExecuTorch's multimodal runner (export/to_executorch.py, docs/executorch.md)."""

    pte: str  # the program file
    tokenizer: str  # the file to hand the runner's tokenizer loader (tokenizer.model or tokenizer.json)
    quantize: str  # fp32 | 8da4w | int8 (the text decoder's linears)
    quantization: dict[str, Any]  # the torchao recipe and what it covered
    max_seq_len: int  # the static KV cache's positions (constant method get_max_seq_len)
    methods: dict[str, dict[str, Any]]  # method -> input/output layout
    constant_methods: dict[str, Any]
    kv_cache: KvCache
    executorch: str  # the version that wrote it
    validation: dict[str, Any] = field(default_factory=dict)  # per method, vs PyTorch
    lowering: dict[str, Any] = field(default_factory=dict)  # export/lowering times, XNNPACK delegates
    source: str = ""
    export_s: float = 0.0
    token_check: TokenCheck | None = None
    validate: str = "strict"
    failed_checks: list[str] = field(default_factory=list)


@dataclass
class TorchInfo:
    """A model dir or preset opened by the torch backend (in memory only: never written)."""

    source: str = ""


TargetInfo = Union[OnnxInfo, GgufInfo, TrtInfo, CoremlInfo, ExecutorchInfo, TorchInfo]
TARGET_INFO: dict[str, type] = {"onnx": OnnxInfo, "gguf": GgufInfo, "trt": TrtInfo, "coreml": CoremlInfo,
                                "executorch": ExecutorchInfo, "torch": TorchInfo}
BUNDLE_TARGETS = ("onnx", "trt", "gguf", "coreml", "executorch")  # what exporters write (torch is a model dir)
