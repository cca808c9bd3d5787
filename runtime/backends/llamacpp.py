"""Backend ``llamacpp``: a GGUF bundle (LLM in one or more quant types + f16 mmproj) run by
llama.cpp through llama-cpp-python's low-level bindings, images through its mtmd bindings.

Images: mtmd takes 8-bit bitmaps, not normalised floats. The runtime's ``pixel_values`` come from
8-bit pixels (pad, resize, crop in PIL), so ``round((x * std + mean) * 255)`` recovers those pixels
exactly; mtmd gets that image_size x image_size bitmap, copies it unresized and normalises it with
the mmproj's mean/std, i.e. the same floats. Pixel values that are not such an image are refused.

Text and visual segments are evaluated with ``llama_decode`` at consecutive positions of one
sequence, token batches and embedding batches (causal, as LLaVA-style LLMs are trained); a decode
step is one single-token ``llama_decode`` and one logits read, nothing else in Python.

Options (``Runtime.load(bundle, **options)``): the common ``threads`` (llama.cpp's and mtmd's
threads; None/0: every usable core), ``verbose`` (this model's llama.cpp/mtmd log on stderr: the log
is process-wide in llama.cpp, ``llamacpp_log`` routes each message to the instance whose call made
it), ``max_context`` (the KV cache's size, llama.cpp's n_ctx; default and most: the LLM's
context_length); and its own: ``quant`` (which LLM file, default the bundle's ``default_quant``),
``n_gpu_layers`` (LLM layers offloaded on CUDA/Metal builds; -1, the default as in llama.cpp, = all,
0 = CPU only; non-zero also runs the vision encoder on the GPU), ``n_batch``, ``warmup``.
GPU offload needs a llama-cpp-python built for it, e.g. on Jetson
``CMAKE_ARGS="-DGGML_CUDA=on" pip install llama-cpp-python``; a CPU build ignores n_gpu_layers.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import BundleError, ContextLengthError, EdgeVLMError
from ..gguf_check import check_pair
from ..hostcpu import resolve_threads
from . import BACKENDS
from .base import check_options, context_limit, Backend, is_visual_segment
from .llamacpp_log import LlamaLog, install as install_log_router


def _import():
    try:
        import llama_cpp
        from llama_cpp import mtmd_cpp
    except ImportError as e:
        raise EdgeVLMError("the llamacpp backend needs llama-cpp-python with mtmd bindings: "
                           f"pip install 'edgevlm[llamacpp]' ({e})") from None
    return llama_cpp, mtmd_cpp


def quiet_llama_logs() -> None:
    """Route llama.cpp's log through ``llamacpp_log`` (exporters call this before quantising: what
    llama.cpp logs outside a backend's call is dropped)."""
    install_log_router(*_import())


class LlamaCppBackend(Backend):
    name = "llamacpp"
    supports_prefix = True

    def __init__(self, llm_path, mmproj_path, *, image_size: int, mean, std, threads: int | None = None,
                 verbose: bool = False, max_context: int | None = None, n_gpu_layers: int = -1,
                 n_batch: int = 512, warmup: bool = False):
        self._model = self._ctx = self._mctx = None
        self._batches: list = []
        self.lib, self.mtmd = _import()
        self.log = LlamaLog(verbose)  # this instance's messages and errors (llamacpp_log)
        install_log_router(self.lib, self.mtmd)
        llm_info, _ = check_pair(llm_path, mmproj_path)  # before llama.cpp sees the files
        self.llm_path, self.mmproj_path = Path(llm_path), Path(mmproj_path)
        self.image_size = int(image_size)
        self._mean = np.asarray(mean, np.float32).reshape(3, 1, 1)
        self._std = np.asarray(std, np.float32).reshape(3, 1, 1)
        self.n_threads = resolve_threads(threads)
        try:
            with self.log.active():
                self._load(Path(llm_path), Path(mmproj_path), llm_info, int(n_gpu_layers), max_context,
                           int(n_batch), warmup)
        except BaseException:
            self.close()
            raise
        self._pos = 0

    # --- loading ----------------------------------------------------------------------------------
    def _load(self, llm: Path, mmproj: Path, info, n_gpu_layers: int, max_context, n_batch: int, warmup: bool):
        L = self.lib
        trained = int(info.get("llama.context_length") or 0)
        n_ctx = (context_limit(max_context, trained, f"{llm.name} (llama.context_length)") if trained
                 else context_limit(max_context, max_context or 2048, "the KV cache"))
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        self._model = L.llama_model_load_from_file(str(llm).encode(), mp)
        if not self._model:
            raise BundleError(f"llama.cpp could not load {llm} ({self.log.last_error()})")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, min(n_batch, n_ctx), min(n_batch, n_ctx)
        cp.n_threads = cp.n_threads_batch = self.n_threads
        cp.no_perf = True
        self._ctx = L.llama_init_from_model(self._model, cp)
        if not self._ctx:
            raise EdgeVLMError(f"llama.cpp could not create a context of {n_ctx} ({self.log.last_error()})")
        self.n_ctx = min(L.llama_n_ctx(self._ctx), n_ctx)  # llama.cpp may pad the cache; the limit is n_ctx
        self.n_batch = L.llama_n_batch(self._ctx)
        self.n_embd = L.llama_model_n_embd(self._model)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self._model))
        self._mem = L.llama_get_memory(self._ctx)
        self._init_batches()
        mc = self.mtmd.mtmd_context_params_default()
        mc.use_gpu, mc.n_threads, mc.print_timings, mc.warmup = n_gpu_layers != 0, self.n_threads, False, warmup
        self._mctx = self.mtmd.mtmd_init_from_file(str(mmproj).encode(), self._model, mc)
        if not self._mctx:
            raise BundleError(f"llama.cpp (mtmd) could not load {mmproj} ({self.log.last_error()})")

    def _init_batches(self) -> None:
        """One token batch and one embedding batch, reused; numpy views on their arrays."""
        L, n = self.lib, self.n_batch
        self._tb = L.llama_batch_init(n, 0, 1)
        self._eb = L.llama_batch_init(n, self.n_embd, 1)
        self._batches = [self._tb, self._eb]
        for b in self._batches:
            for i in range(n):
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
        view = np.ctypeslib.as_array
        self._tok = view(self._tb.token, shape=(n,))
        self._tpos, self._tlog = view(self._tb.pos, shape=(n,)), view(self._tb.logits, shape=(n,))
        self._emb = view(self._eb.embd, shape=(n, self.n_embd))  # [n_batch, D]
        self._epos, self._elog = view(self._eb.pos, shape=(n,)), view(self._eb.logits, shape=(n,))

    # --- images -----------------------------------------------------------------------------------
    def _bitmap_pixels(self, pixel_values: np.ndarray) -> np.ndarray:
        """[3, S, S] normalised floats -> [S, S, 3] uint8 (the pixels they were made from)."""
        if pixel_values.shape != (3, self.image_size, self.image_size):
            raise EdgeVLMError(f"llamacpp backend: pixel_values of shape {pixel_values.shape}, "
                               f"expected (3, {self.image_size}, {self.image_size})")
        u8 = np.clip(np.rint((pixel_values * self._std + self._mean) * 255.0), 0, 255)  # [3, S, S]
        back = (u8 / 255.0 - self._mean) / self._std
        if np.abs(back - pixel_values).max() > 1e-3:
            raise EdgeVLMError("llamacpp backend: pixel_values are not 8-bit pixels normalised with "
                               "this bundle's mean/std (use edgevlm.runtime.preprocess); llama.cpp "
                               "takes images as 8-bit bitmaps")
        return np.ascontiguousarray(u8.astype(np.uint8).transpose(1, 2, 0))

    def _encode_one(self, hwc: np.ndarray) -> np.ndarray:
        with self.log.active():
            return self._encode_bitmap(hwc)

    def _encode_bitmap(self, hwc: np.ndarray) -> np.ndarray:
        m = self.mtmd
        s = self.image_size
        bitmap = m.mtmd_bitmap_init(s, s, hwc.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        chunks = m.mtmd_input_chunks_init()
        try:
            part = m.mtmd_input_part(None, bitmap)
            parts = (ctypes.POINTER(m.mtmd_input_part) * 1)(ctypes.pointer(part))
            if m.mtmd_tokenize_from_parts(self._mctx, chunks, parts, 1, False) != 0:
                raise EdgeVLMError(f"mtmd could not take the image ({self.log.last_error()})")
            chunk = next(c for c in (m.mtmd_input_chunks_get(chunks, i)
                                     for i in range(m.mtmd_input_chunks_size(chunks)))
                         if m.mtmd_input_chunk_get_type(c) == m.MTMD_INPUT_CHUNK_TYPE_IMAGE)
            if m.mtmd_encode_chunk(self._mctx, chunk) != 0:
                raise EdgeVLMError(f"mtmd failed to encode the image ({self.log.last_error()})")
            n = m.mtmd_input_chunk_get_n_tokens(chunk)
            out = np.ctypeslib.as_array(m.mtmd_get_output_embd(self._mctx), shape=(n * self.n_embd,))
            return out.reshape(n, self.n_embd).copy()  # [M, D]
        finally:
            m.mtmd_input_chunks_free(chunks)
            m.mtmd_bitmap_free(bitmap)

    def encode_image(self, pixel_values: np.ndarray) -> np.ndarray:
        pv = np.asarray(pixel_values, dtype=np.float32)  # [B, 3, S, S]
        return np.stack([self._encode_one(self._bitmap_pixels(x)) for x in pv])  # [B, M, D]

    # --- the sequence -----------------------------------------------------------------------------
    def _run(self, batch, n: int) -> None:
        batch.n_tokens = n
        with self.log.active():
            rc = self.lib.llama_decode(self._ctx, batch)
        if rc == 1:
            raise ContextLengthError(f"llama.cpp found no room in its {self.n_ctx}-position KV cache")
        if rc != 0:
            raise EdgeVLMError(f"llama_decode failed with status {rc} ({self.log.last_error()})")
        self._pos += n

    def _feed(self, segment: np.ndarray, want_logits: bool) -> None:
        """Evaluate one segment in n_batch-sized pieces at the next positions."""
        visual = is_visual_segment(segment)
        total = segment.shape[0]
        for start in range(0, total, self.n_batch):
            n = min(self.n_batch, total - start)
            if visual:
                if segment.shape[1] != self.n_embd:
                    raise EdgeVLMError(f"visual segment width {segment.shape[1]} != LLM width {self.n_embd}")
                batch, pos, log = self._eb, self._epos, self._elog
                self._emb[:n] = segment[start:start + n]
            else:
                batch, pos, log = self._tb, self._tpos, self._tlog
                self._tok[:n] = segment[start:start + n]
            pos[:n] = np.arange(self._pos, self._pos + n)
            log[:n] = 0
            log[n - 1] = want_logits and start + n == total
            self._run(batch, n)

    def _logits(self) -> np.ndarray:
        ptr = self.lib.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def prefill(self, segments: Sequence[np.ndarray]) -> np.ndarray:
        self.lib.llama_memory_clear(self._mem, True)
        self._pos = 0
        return self._feed_all(segments)

    @property
    def n_past(self) -> int:
        return self._pos

    def prefill_from(self, keep: int, segments: Sequence[np.ndarray]) -> np.ndarray:
        if not 0 < keep <= self._pos:
            raise RuntimeError(f"cannot keep {keep} positions of a sequence of {self._pos}")
        if not self.lib.llama_memory_seq_rm(self._mem, 0, keep, -1):
            raise RuntimeError(f"llama.cpp could not drop KV positions from {keep} on")
        self._pos = keep
        return self._feed_all(segments)

    def _feed_all(self, segments: Sequence[np.ndarray]) -> np.ndarray:
        """Evaluate ``segments`` after the current positions; logits [V] of the last."""
        segments = [s for s in segments if len(s)]
        if not segments:
            raise EdgeVLMError("prefill needs at least one token")
        for i, seg in enumerate(segments):
            self._feed(seg if is_visual_segment(seg) else np.asarray(seg, np.int32), i == len(segments) - 1)
        return self._logits()

    def decode(self, token_id: int) -> np.ndarray:
        if self._pos == 0:
            raise RuntimeError("decode before prefill")
        self._tok[0], self._tpos[0], self._tlog[0] = token_id, self._pos, 1
        self._run(self._tb, 1)
        return self._logits()

    def close(self) -> None:
        if getattr(self, "lib", None) is None:
            return
        with self.log.active():
            self._free()

    def _free(self) -> None:
        L = self.lib
        if self._mctx:
            self.mtmd.mtmd_free(self._mctx)
            self._mctx = None
        for b in self._batches:
            L.llama_batch_free(b)
        self._batches = []
        if self._ctx:
            L.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            L.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def bundle_files(root: Path, manifest, quant: str | None) -> tuple[Path, Path, str]:
    """(LLM path, mmproj path, quant) of a GGUF bundle."""
    if manifest.target != "gguf":
        raise BundleError(f"{root}: a {manifest.target!r} bundle; the llamacpp backend runs GGUF bundles")
    llms = manifest.target_info.llm
    quant = (quant or manifest.target_info.default_quant or next(iter(llms), "")).lower()
    if quant not in llms:
        raise BundleError(f"{root}: no {quant!r} LLM in this bundle; it has: {', '.join(llms) or 'none'}")
    return root / llms[quant], root / manifest.file("mmproj").path, quant


OPTIONS = ("quant", "n_gpu_layers", "n_batch", "warmup")  # + COMMON_OPTIONS


def open_bundle(root, manifest, quant: str | None = None, **options) -> LlamaCppBackend:
    check_options("llamacpp", {"quant": quant, **options}, OPTIONS)
    root = Path(root)
    llm, mmproj, quant = bundle_files(root, manifest, quant)
    pp = manifest.preprocess
    be = LlamaCppBackend(llm, mmproj, image_size=pp.image_size, mean=pp.mean, std=pp.std, **options)
    be.quant = quant
    return be


BACKENDS.add("llamacpp", open_bundle)
