"""Backend ``ort``: an ONNX bundle (vision_encoder / embed_tokens / decoder_model_merged) in ONNX Runtime.

Options (``Runtime.load(bundle, **options)``): the common ones (``backends.base.COMMON_OPTIONS``)
    threads             intra-op threads of every session (None/0: every usable core)
    verbose             ONNX Runtime's session log at INFO on stderr (default: errors only)
    max_context         the most positions a sequence holds (default and most: the model's); the
                        in-place KV buffers never grow past it
and its own:
    providers           "cpu" (default) | "cuda" | "tensorrt" | a list of ONNX Runtime provider names
    graph_optimization  "disable" | "basic" | "extended" | "all" (default)
    io_binding          keep the KV cache as OrtValues between steps (default True)
    model_format        "onnx" (default) | "ort" (the bundle's .ort files, as ONNX Runtime Mobile runs them)
    profile_dir         a folder: each graph's session records ONNX Runtime's profile (per-op
                        kernel times) there; ``end_profiling()`` returns {graph: trace file}

The KV cache never round-trips through numpy. With a standard decoder graph the ``present.*``
outputs are bound as the next step's ``past_key_values.*`` inputs (on the GPU for CUDA/TensorRT).
With a GroupQueryAttention decoder (manifest ``kv_cache.in_place``) on CPU, one preallocated buffer
per layer and kind, [1, H_kv, capacity, Dh], is bound as both past and present: the graph writes
each new position into it, so no step copies the cache. Capacity grows in blocks of
``KV_BLOCK`` positions, up to the context. Only the logits come back to the host.
onnxruntime is imported when a backend is opened, never at import time.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import BundleError, EdgeVLMError
from ..graph_io import (
    ATTENTION_MASK, INPUT_IDS, INPUTS_EMBEDS, LOGITS, PIXEL_VALUES, POSITION_IDS, is_past, is_present, past_key,
)
from ..hostcpu import resolve_threads
from ..manifest import Manifest
from . import BACKENDS
from .base import check_options, context_limit, Backend, is_visual_segment

PROVIDER_ALIASES = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
OPT_LEVELS = ("disable", "basic", "extended", "all")
KV_BLOCK = 256  # in-place KV buffers grow by this many positions
_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise EdgeVLMError("the ort backend needs ONNX Runtime: pip install 'edgevlm[ort]' "
                           "(or onnxruntime-gpu for CUDA/TensorRT)") from None
    return onnxruntime


def resolve_providers(ort, providers: str | Sequence[str] | None) -> list[str]:
    """Provider names for ``providers``; an unavailable provider is an error that lists the available."""
    if providers is None:
        wanted = PROVIDER_ALIASES["cpu"]
    elif isinstance(providers, str):
        wanted = PROVIDER_ALIASES.get(providers.lower(), [providers])
    else:
        wanted = list(providers)
    available = ort.get_available_providers()
    missing = [p for p in wanted[:1] if p not in available]  # fall-backs after the first may be absent
    if missing:
        raise EdgeVLMError(f"ONNX Runtime execution provider {missing[0]} is not available in this install "
                           f"(available: {', '.join(available)}); for CUDA/TensorRT install onnxruntime-gpu")
    return [p for p in wanted if p in available]


def session_options(ort, threads: int | None = None, graph_optimization: str = "all", verbose: bool = False):
    if graph_optimization not in OPT_LEVELS:
        raise EdgeVLMError(f"graph_optimization must be one of {', '.join(OPT_LEVELS)}, got {graph_optimization!r}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = resolve_threads(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[graph_optimization]
    opts.log_severity_level = 1 if verbose else 3  # INFO | ERROR; per session, so per backend instance
    return opts


def _warn_if_int8_saturates(manifest: Manifest, device: str) -> None:
    """A bundle exported with ``--int8-target vnni`` loses accuracy on x86 CPUs without VNNI."""
    from ..hostcpu import cpu_class, u8s8_saturates

    int8 = manifest.target_info.int8
    if int8 is not None and int8.target == "vnni" and device == "cpu" and u8s8_saturates():
        warnings.warn(f"this int8 bundle was exported with --int8-target vnni, whose u8 x s8 kernels saturate on "
                      f"this {cpu_class()} CPU (no VNNI): expect several times the int8 error; re-export with "
                      "--int8-target portable", RuntimeWarning, stacklevel=3)


class OrtBackend(Backend):
    name = "ort"
    supports_prefix = True

    def __init__(self, root: Path, manifest: Manifest, providers: str | Sequence[str] | None = None,
                 threads: int | None = None, verbose: bool = False, max_context: int | None = None,
                 graph_optimization: str = "all", io_binding: bool = True, model_format: str = "onnx",
                 profile_dir: str | None = None):
        if manifest.target != "onnx":
            raise BundleError(f"{root}: a {manifest.target!r} bundle; the ort backend reads ONNX bundles")
        if model_format not in ("onnx", "ort"):
            raise EdgeVLMError(f"model_format must be 'onnx' or 'ort', got {model_format!r}")
        self.n_ctx = context_limit(max_context, manifest.model.max_positions, "the model (max_positions)")
        ort = import_ort()
        self.ort = ort
        self.providers = resolve_providers(ort, providers)
        self.device = "cuda" if self.providers[0] != "CPUExecutionProvider" else "cpu"
        role = (lambda g: f"{g}_ort") if model_format == "ort" else (lambda g: g)
        if profile_dir is not None:
            Path(profile_dir).mkdir(parents=True, exist_ok=True)
        self.sessions = {}
        for g in ("vision_encoder", "embed_tokens", "decoder"):
            opts = session_options(ort, threads, graph_optimization, verbose)
            if profile_dir is not None:
                opts.enable_profiling, opts.profile_file_prefix = True, str(Path(profile_dir) / g)
            self.sessions[g] = self._session(root, manifest, role(g), opts)
        self.io_binding = io_binding
        dec = self.sessions["decoder"]
        self.past_names = [i.name for i in dec.get_inputs() if is_past(i.name)]
        self.present_names = [o.name for o in dec.get_outputs() if is_present(o.name)]
        if len(self.past_names) != 2 * manifest.model.num_layers or len(self.present_names) != len(self.past_names):
            raise BundleError(f"{root}: decoder graph has {len(self.past_names)} past inputs, expected "
                              f"{2 * manifest.model.num_layers} ({past_key('{i}')}/value)")
        types = {i.name: i.type for i in dec.get_inputs()}
        self.embeds_dtype = _NP_TYPES[types[INPUTS_EMBEDS]]
        self.kv_dtype = _NP_TYPES[types[self.past_names[0]]]
        self.kv_shape = (1, manifest.model.num_kv_heads, 0, manifest.model.head_dim)  # [B, H_kv, 0, Dh]
        _warn_if_int8_saturates(manifest, self.device)
        in_place = manifest.target_info.kv_cache.in_place
        self.in_place = in_place and io_binding and self.device == "cpu"
        self._past: list[Any] | None = None  # OrtValues (io_binding) or numpy arrays
        self._buffers: list[np.ndarray] = []  # in-place mode: [1, H_kv, capacity, Dh] each
        self._pos = 0

    def _session(self, root: Path, manifest: Manifest, role: str, opts):
        entry = manifest.file(role)
        try:
            return self.ort.InferenceSession(str(root / entry.path), opts, providers=self.providers)
        except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise BundleError(f"{root / entry.path}: ONNX Runtime cannot load it ({type(e).__name__}: {e})") from None

    # --- the Backend interface -------------------------------------------------------------------

    def encode_image(self, pixel_values: np.ndarray) -> np.ndarray:
        s = self.sessions["vision_encoder"]
        x = pixel_values.astype(_NP_TYPES[s.get_inputs()[0].type], copy=False)  # [B, 3, S, S]
        return np.asarray(s.run(None, {PIXEL_VALUES: x})[0], dtype=np.float32)  # [B, M, D]

    def embed(self, ids: np.ndarray) -> np.ndarray:
        out = self.sessions["embed_tokens"].run(None, {INPUT_IDS: np.asarray(ids, dtype=np.int64)[None]})[0]
        return out[0]  # [T, D]

    def _embed_segments(self, segments: Sequence[np.ndarray]) -> np.ndarray:
        parts = [s if is_visual_segment(s) else self.embed(s) for s in segments]
        return np.concatenate([p.astype(self.embeds_dtype, copy=False) for p in parts])[None]  # [1, T, D]

    def prefill(self, segments: Sequence[np.ndarray]) -> np.ndarray:
        x = self._embed_segments(segments)  # [1, T, D]
        self._pos = 0
        if not self.in_place:  # in place: keep the buffers, positions >= 0 are simply rewritten
            self._past = self._empty_past()
        return self._step(x)

    @property
    def n_past(self) -> int:
        return self._pos if self._past is not None else 0

    def prefill_from(self, keep: int, segments: Sequence[np.ndarray]) -> np.ndarray:
        """Keep ``keep`` cached positions (in place: later ones are simply rewritten) and run the rest."""
        if self._past is None or not 0 < keep <= self._pos:
            raise RuntimeError(f"cannot keep {keep} positions of a sequence of {self._pos}")
        if not self.in_place and keep < self._pos:
            self._past = [self._truncated(v, keep) for v in self._past]
        self._pos = keep
        x = self._embed_segments(segments)  # [1, T, D]
        return self._step(x)

    def _truncated(self, past, keep: int):
        """The first ``keep`` positions of one past tensor [1, H_kv, P, Dh] (numpy or OrtValue)."""
        if not self.io_binding:
            return past[:, :, :keep]
        kept = np.ascontiguousarray(past.numpy()[:, :, :keep])
        return self.ort.OrtValue.ortvalue_from_numpy(kept, self.device, 0)

    def decode(self, token_id: int) -> np.ndarray:
        if self._past is None or (self.in_place and self._pos == 0):
            raise RuntimeError("decode before prefill")
        x = self.embed(np.array([token_id], dtype=np.int64)).astype(self.embeds_dtype, copy=False)[None]  # [1, 1, D]
        return self._step(x)

    def end_profiling(self) -> dict[str, str]:
        """{graph: ONNX Runtime profile trace (JSON)} when opened with ``profile_dir``."""
        return {g: s.end_profiling() for g, s in self.sessions.items()}

    def close(self) -> None:
        self._past = None
        self._buffers = []

    # --- the decoder step --------------------------------------------------------------------------

    def _empty_past(self) -> list[Any]:
        empty = np.zeros(self.kv_shape, dtype=self.kv_dtype)  # [1, H_kv, 0, Dh]
        if not self.io_binding:
            return [empty] * len(self.past_names)
        return [self.ort.OrtValue.ortvalue_from_numpy(empty, self.device, 0) for _ in self.past_names]

    def _step(self, x: np.ndarray) -> np.ndarray:
        """Run the decoder on ``x`` [1, T, D] after ``self._pos`` cached positions; logits [V] of the last."""
        t = x.shape[1]
        total = self._pos + t
        feeds = {INPUTS_EMBEDS: x, ATTENTION_MASK: np.ones((1, total), dtype=np.int64),
                 POSITION_IDS: np.arange(self._pos, total, dtype=np.int64)[None]}  # [1, T]
        if self.in_place:
            self._reserve(total)
            logits = self._run_in_place(feeds)
        else:
            run = self._run_bound if self.io_binding else self._run_plain
            logits, self._past = run(feeds)
        self._pos = total
        return np.asarray(logits[0, -1], dtype=np.float32)

    def _reserve(self, total: int) -> None:
        """Make the in-place buffers hold ``total`` positions (keeping the first ``self._pos``)."""
        capacity = self._buffers[0].shape[2] if self._buffers else 0
        if total <= capacity:
            return
        capacity = max(total, min(self.n_ctx, -(-total // KV_BLOCK) * KV_BLOCK))
        shape = (*self.kv_shape[:2], capacity, self.kv_shape[3])
        grown = [np.zeros(shape, dtype=self.kv_dtype) for _ in self.past_names]
        for new, old in zip(grown, self._buffers):
            new[:, :, : self._pos] = old[:, :, : self._pos]
        self._buffers = grown
        self._past = [self.ort.OrtValue.ortvalue_from_numpy(b) for b in grown]  # shares their memory

    def _run_in_place(self, feeds: dict) -> np.ndarray:
        s = self.sessions["decoder"]
        io = s.io_binding()
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        io.bind_output(LOGITS, "cpu")
        for past, present, value in zip(self.past_names, self.present_names, self._past):
            io.bind_ortvalue_input(past, value)
            io.bind_ortvalue_output(present, value)  # GroupQueryAttention writes the new positions in place
        s.run_with_iobinding(io)
        return io.get_outputs()[0].numpy()

    def _run_plain(self, feeds: dict) -> tuple[np.ndarray, list]:
        s = self.sessions["decoder"]
        out = s.run([LOGITS, *self.present_names], {**feeds, **dict(zip(self.past_names, self._past))})
        return out[0], out[1:]

    def _run_bound(self, feeds: dict) -> tuple[np.ndarray, list]:
        s = self.sessions["decoder"]
        io = s.io_binding()
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        for name, value in zip(self.past_names, self._past):
            io.bind_ortvalue_input(name, value)
        io.bind_output(LOGITS, "cpu")
        for name in self.present_names:
            io.bind_output(name, self.device)  # ONNX Runtime allocates; no copy to numpy
        s.run_with_iobinding(io)
        outs = io.get_outputs()
        return outs[0].numpy(), list(outs[1:])


OPTIONS = ("providers", "graph_optimization", "io_binding", "model_format", "profile_dir")  # + COMMON_OPTIONS


def _open(root: Path, manifest: Manifest, **options: Any) -> OrtBackend:
    check_options("ort", options, OPTIONS)
    return OrtBackend(root, manifest, **options)


BACKENDS.add("ort", _open)
