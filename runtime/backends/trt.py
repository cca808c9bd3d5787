"""Backend ``trt``: a TensorRT bundle (vision_encoder / embed_tokens / decoder engines built by
``export/to_trt.py``) on an NVIDIA GPU or Jetson.

Device memory comes from cuda-python's runtime API through ``runtime.cuda_device`` (shared with
the TensorRT exporter, as is the engine/GPU compatibility check): one CUDA stream, and every
input/output buffer allocated once, at load, for the largest shapes the engines' optimisation profiles allow (``--max-seq`` at build time is the
context length). The KV cache never leaves the GPU: each layer's ``past``/``present`` tensors use
two buffers whose roles swap every step (the decoder writes the whole present cache, so it cannot
write in place). A decode step feeds the embed engine's output buffer to the decoder as is; prefill
assembles the prompt's embeddings in the decoder's input buffer with device-to-device copies (text)
and uploads (visual tokens), since TensorRT wants 256-byte aligned tensor addresses, not offsets.
``attention_mask`` is all ones, written once. Per decode step the host sends a token id and a
position (8 bytes each) and reads one logits row.
Every call returns after a stream synchronisation, so the loop's timings are GPU time.

An engine runs only on the TensorRT version and GPU it was built for; the manifest records both and
the backend refuses a mismatch with a message instead of crashing in TensorRT.

Options (``Runtime.load(bundle, **options)``): the common ``verbose`` (TensorRT's log at INFO instead
of WARNING; TensorRT's logger belongs to the instance), ``max_context`` (at most the engines' context,
``--max-seq`` at build time: the buffers are sized then, so this only lowers the limit) and
``threads`` (checked, no effect: the engines run on the GPU and the host side is one thread); and
``device`` (CUDA device index, default 0).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..cuda_device import Cuda, compatibility, import_cudart, import_tensorrt, incompatibility_message
from ..errors import BundleError, EdgeVLMError
from ..graph_io import (
    ATTENTION_MASK, IMAGE_FEATURES, INPUT_IDS, INPUTS_EMBEDS, LOGITS, PIXEL_VALUES, POSITION_IDS, is_past,
    is_present, present_for,
)
from ..hostcpu import resolve_threads
from ..manifest import Manifest
from . import BACKENDS
from .base import check_options, context_limit, Backend, is_visual_segment

# --- pure helpers (unit-tested without TensorRT) --------------------------------------------------


def kv_pairs(inputs: Sequence[str], outputs: Sequence[str]) -> list[tuple[str, str]]:
    """[(past_key_values.i.k, present.i.k)] in input order; every past input needs its present output."""
    pairs = [(n, present_for(n)) for n in inputs if is_past(n)]
    missing = [p for _, p in pairs if p not in outputs]
    extra = [o for o in outputs if is_present(o) and o not in {p for _, p in pairs}]
    if missing or extra or not pairs:
        raise BundleError(f"decoder engine KV inputs/outputs do not pair up (missing {missing}, extra {extra})")
    return pairs


def step_shapes(past: int, t: int, hidden: int, kv_shape: tuple[int, int], past_names: Sequence[str]) -> dict:
    """Decoder input shapes for ``t`` new positions after ``past`` cached ones (batch 1)."""
    heads, head_dim = kv_shape
    shapes = {INPUTS_EMBEDS: (1, t, hidden), ATTENTION_MASK: (1, past + t), POSITION_IDS: (1, t)}
    shapes.update({n: (1, heads, past, head_dim) for n in past_names})
    return shapes


def pick_profile(ranges: list[dict[str, tuple]], shapes: dict[str, tuple]) -> int:
    """The first profile whose (min, max) ranges hold every given input shape."""
    for i, prof in enumerate(ranges):
        if all(n not in prof or all(lo <= d <= hi for d, lo, hi in zip(s, prof[n][0], prof[n][2]))
               for n, s in shapes.items()):
            return i
    raise EdgeVLMError(f"no optimisation profile of the engine accepts shapes {shapes}; rebuild the engines "
                       "with a larger --max-seq / --max-batch")


def nbytes(shape: Sequence[int], itemsize: int) -> int:
    """Bytes for a tensor; at least 1 (TensorRT needs a valid address even for an empty tensor)."""
    return max(1, int(np.prod(shape, dtype=np.int64)) * itemsize)


def elementwise_max(shapes: Sequence[Sequence[int]]) -> tuple[int, ...]:
    return tuple(int(max(d)) for d in zip(*shapes))


class Engine:
    """One deserialised engine, its execution context and its device buffers (allocated once, for
    the profiles' largest shapes; names in ``external`` get no buffer: the caller passes addresses)."""

    def __init__(self, trt, cuda: Cuda, engine, external: Sequence[str] = ()):
        self.trt, self.cuda, self.engine = trt, cuda, engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_in = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_in[n]]
        self.outputs = [n for n in names if not is_in[n]]
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        dynamic = [n for n in self.inputs if -1 in tuple(engine.get_tensor_shape(n))]
        self.ranges = [{n: tuple(tuple(s) for s in engine.get_tensor_profile_shape(n, p)) for n in dynamic}
                       for p in range(engine.num_optimization_profiles)]
        self.profile = -1
        self.max_shapes = self._max_shapes()
        self.buffers = {n: cuda.malloc(nbytes(s, self.dtypes[n].itemsize))
                        for n, s in self.max_shapes.items() if n not in external}

    def _max_shapes(self) -> dict[str, tuple[int, ...]]:
        """Largest shape of every tensor: inputs at each profile's max, outputs as TensorRT infers them."""
        seen: dict[str, list] = {}
        for p, prof in enumerate(self.ranges or [{}]):
            self.set_profile(p)
            for n in self.inputs:
                if n in prof:
                    self.context.set_input_shape(n, prof[n][2])
                seen.setdefault(n, []).append(prof[n][2] if n in prof else tuple(self.engine.get_tensor_shape(n)))
            for n in self.outputs:
                seen.setdefault(n, []).append(tuple(self.context.get_tensor_shape(n)))
        return {n: elementwise_max(s) for n, s in seen.items()}

    def set_profile(self, p: int) -> None:
        if p != self.profile and self.engine.num_optimization_profiles > 1:
            if not self.context.set_optimization_profile_async(p, self.cuda.handle):
                raise RuntimeError(f"TensorRT refused optimisation profile {p}")
        self.profile = p

    def run(self, shapes: dict[str, tuple], addresses: dict[str, int] | None = None) -> None:
        """Enqueue one execution with these input shapes (inputs not named keep the engine's fixed shape)."""
        self.set_profile(pick_profile(self.ranges, shapes) if self.ranges else 0)
        addresses = addresses or {}
        for n, s in shapes.items():
            if not self.context.set_input_shape(n, tuple(int(d) for d in s)):
                raise EdgeVLMError(f"TensorRT rejected shape {s} for {n}")
        for n in (*self.inputs, *self.outputs):
            self.context.set_tensor_address(n, addresses.get(n, self.buffers.get(n, 0)))
        if not self.context.execute_async_v3(self.cuda.handle):
            raise RuntimeError("TensorRT execute_async_v3 failed (see TensorRT's log above)")

    def output_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.context.get_tensor_shape(name))


# --- the backend ----------------------------------------------------------------------------------


class TrtBackend(Backend):
    name = "trt"

    def __init__(self, root: Path, manifest: Manifest, device: int = 0, verbose: bool = False,
                 max_context: int | None = None):
        if manifest.target != "trt":
            raise BundleError(f"{root}: a {manifest.target!r} bundle; the trt backend reads TensorRT bundles "
                              "(python export/to_trt.py --bundle ONNX_BUNDLE --out DIR)")
        trt = import_tensorrt()
        self.cuda = Cuda(import_cudart(), device)
        try:
            self._load(trt, Path(root), manifest, verbose)
            self.n_ctx = context_limit(max_context, self.n_ctx, "the TensorRT engines (--max-seq)")
        except BaseException:
            self.close()
            raise

    def _load(self, trt, root: Path, manifest: Manifest, verbose: bool) -> None:
        errors, warnings = compatibility(manifest.target_info, trt.__version__, self.cuda.info())
        if errors:
            raise BundleError(incompatibility_message(root, manifest.target_info, errors))
        for w in warnings:
            print(f"edgevlm trt: warning: {w}", file=sys.stderr)
        self.logger = trt.Logger(trt.Logger.INFO if verbose else trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        raw = {g: self._deserialize(root, manifest, g) for g in ("vision_encoder", "embed_tokens", "decoder")}
        self.vision = Engine(trt, self.cuda, raw["vision_encoder"])
        names = [raw["decoder"].get_tensor_name(i) for i in range(raw["decoder"].num_io_tensors)]
        self.pairs = kv_pairs([n for n in names if is_past(n)], names)
        self.decoder = Engine(trt, self.cuda, raw["decoder"], external=[p for p, _ in self.pairs])
        d = self.decoder
        for p, q in self.pairs:  # both halves of a ping-pong pair hold a full (present-sized) cache
            d.buffers[p] = self.cuda.malloc(nbytes(d.max_shapes[q], d.dtypes[q].itemsize))
        self.embed = Engine(trt, self.cuda, raw["embed_tokens"])
        m = manifest.model
        self.hidden, self.kv_shape = m.hidden_size, (m.num_kv_heads, m.head_dim)
        self.vocab = d.max_shapes[LOGITS][-1]  # [1, T, V]
        if self.embed.dtypes[INPUTS_EMBEDS] != self.decoder.dtypes[INPUTS_EMBEDS]:
            raise BundleError(f"{root}: embed_tokens and decoder engines disagree on the embedding dtype")
        self.n_ctx = min(m.max_positions, self.decoder.max_shapes[ATTENTION_MASK][1])
        self._fill_constants()
        self._pos = 0
        self._flip = False  # False: the cache is in the past buffers; True: in the present buffers

    def _deserialize(self, root: Path, manifest: Manifest, graph: str):
        path = root / manifest.file(graph).path
        engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BundleError(f"{path}: TensorRT could not deserialise the engine (see TensorRT's log above)")
        return engine

    def _fill_constants(self) -> None:
        """attention_mask is all ones (one sequence, no padding): written once, every step reads a prefix."""
        d = self.decoder
        n = d.max_shapes[ATTENTION_MASK][1]
        self.cuda.h2d(d.buffers[ATTENTION_MASK], np.ones(n, dtype=d.dtypes[ATTENTION_MASK]))
        self.cuda.sync()

    # --- the Backend interface -------------------------------------------------------------------

    def encode_image(self, pixel_values: np.ndarray) -> np.ndarray:
        v = self.vision
        lo, _, hi = v.ranges[0][PIXEL_VALUES] if v.ranges else (v.max_shapes[PIXEL_VALUES],) * 3
        b_min, b_max = lo[0], hi[0]  # [B, 3, S, S]
        outs = []
        for start in range(0, len(pixel_values), b_max):
            chunk = pixel_values[start:start + b_max].astype(v.dtypes[PIXEL_VALUES], copy=False)  # [b, 3, S, S]
            n = len(chunk)
            if n < b_min:  # a fixed-batch (DLA) engine: pad with zeros
                chunk = np.concatenate([chunk, np.zeros((b_min - n, *chunk.shape[1:]), chunk.dtype)])
            self.cuda.h2d(v.buffers[PIXEL_VALUES], chunk)
            v.run({PIXEL_VALUES: chunk.shape})
            out = np.empty(v.output_shape(IMAGE_FEATURES), v.dtypes[IMAGE_FEATURES])  # [b, M, D]
            outs.append(self.cuda.d2h(out, v.buffers[IMAGE_FEATURES])[:n])
        return np.concatenate(outs).astype(np.float32, copy=False)

    def prefill(self, segments: Sequence[np.ndarray]) -> np.ndarray:
        d, e = self.decoder, self.embed
        dtype = d.dtypes[INPUTS_EMBEDS]
        row = self.hidden * dtype.itemsize
        base, offset = d.buffers[INPUTS_EMBEDS], 0
        for seg in segments:
            t = len(seg)
            if t == 0:
                continue
            if offset + t > d.max_shapes[INPUTS_EMBEDS][1]:
                raise EdgeVLMError(f"prompt of {offset + t}+ positions exceeds the engines' {self.n_ctx}")
            if is_visual_segment(seg):  # [M, D] float
                self.cuda.h2d(base + offset * row, seg.astype(dtype, copy=False))
            else:  # token ids [T] -> embeddings [1, T, D] on the device, copied into place
                self.cuda.h2d(e.buffers[INPUT_IDS], np.asarray(seg, dtype=e.dtypes[INPUT_IDS]))
                e.run({INPUT_IDS: (1, t)})
                self.cuda.d2d(base + offset * row, e.buffers[INPUTS_EMBEDS], t * row)
            offset += t
        self._pos, self._flip = 0, False
        return self._step(offset, base)

    def decode(self, token_id: int) -> np.ndarray:
        if self._pos == 0:
            raise RuntimeError("decode before prefill")
        if self._pos >= self.n_ctx:
            raise EdgeVLMError(f"the context is full ({self.n_ctx} positions, the engines' --max-seq)")
        e = self.embed
        self.cuda.h2d(e.buffers[INPUT_IDS], np.array([token_id], dtype=e.dtypes[INPUT_IDS]))
        e.run({INPUT_IDS: (1, 1)})
        return self._step(1, e.buffers[INPUTS_EMBEDS])  # the decoder reads the embed engine's output

    def _step(self, t: int, embeds: int) -> np.ndarray:
        """Run the decoder on ``t`` embeddings (at device address ``embeds``) after ``self._pos``
        cached positions; logits [V] of the last."""
        d = self.decoder
        past = self._pos
        shapes = step_shapes(past, t, self.hidden, self.kv_shape, [p for p, _ in self.pairs])
        self.cuda.h2d(d.buffers[POSITION_IDS], np.arange(past, past + t, dtype=d.dtypes[POSITION_IDS]))
        addresses = {INPUTS_EMBEDS: embeds}
        for p, q in self.pairs:  # ping-pong: read the cache from one buffer, write the whole of it to the other
            a, b = d.buffers[p], d.buffers[q]
            addresses[p], addresses[q] = (b, a) if self._flip else (a, b)
        d.run(shapes, addresses)
        self._flip = not self._flip
        self._pos = past + t
        logits_dtype = d.dtypes[LOGITS]
        row = np.empty(self.vocab, logits_dtype)  # only the last position's logits come back
        self.cuda.d2h(row, d.buffers[LOGITS] + (t - 1) * self.vocab * logits_dtype.itemsize)
        return row.astype(np.float32, copy=False)

    def close(self) -> None:
        """Contexts, then engines, then the runtime, then the device buffers and the stream."""
        for name in ("vision", "embed", "decoder"):
            eng = getattr(self, name, None)
            if eng is not None:
                eng.context = eng.engine = None
                setattr(self, name, None)
        self.runtime = None
        if getattr(self, "cuda", None) is not None:
            self.cuda.close()


OPTIONS = ("device",)  # + COMMON_OPTIONS


def _open(root: Path, manifest: Manifest, threads: int | None = None, **options: Any) -> TrtBackend:
    check_options("trt", options, OPTIONS)
    resolve_threads(threads)  # a bad value is refused as on every backend; the GPU needs no CPU threads
    return TrtBackend(root, manifest, **options)


BACKENDS.add("trt", _open)
