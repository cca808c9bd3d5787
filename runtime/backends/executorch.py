"""Backend ``executorch``: an ExecuTorch bundle (one ``.pte``: vision_encoder / token_embedding /
text_decoder, export/to_executorch.py) through ExecuTorch's Python runtime (``executorch.runtime``).

ExecuTorch's Python bindings import torch (its tensors are the bindings' inputs and outputs), so this
backend needs ``pip install 'edgevlm[executorch]'`` -- a workstation install. On a phone an app links
ExecuTorch's C++ ``MultimodalRunner`` against the same ``.pte`` instead (docs/executorch.md).

Options: the common ones (``backends.base.COMMON_OPTIONS``)
    threads      XNNPACK's thread pool size (None/0: every usable core); the pool is process-wide
    verbose      accepted; ExecuTorch's log level is fixed when its library is built
    max_context  the most positions a sequence holds (default and most: the .pte's static KV cache,
                 ``max_seq_len``)

The decoder's KV cache is a static buffer inside the program: a step writes its positions and attends
to the positions before it, so keeping a prefix (``prefill_from``) is just restarting at ``keep``. The
Python runtime shares one memory arena among the host methods of a program, which would let the
embedding methods overwrite the cache between decoder steps; the decoder therefore runs from its own
loaded copy of the program (the C++ runner gives every method its own planned memory).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import BundleError, EdgeVLMError
from ..hostcpu import resolve_threads
from ..manifest import Manifest
from . import BACKENDS
from .base import Backend, check_options, context_limit, is_visual_segment

METHODS = ("vision_encoder", "token_embedding", "text_decoder")


def import_executorch():
    try:
        import torch
        from executorch.runtime import Runtime
    except ImportError:
        raise EdgeVLMError("the executorch backend needs ExecuTorch (and the torch it imports): "
                           "pip install 'edgevlm[executorch]'") from None
    return torch, Runtime.get()


def set_threads(threads: int | None) -> None:
    """XNNPACK's (process-wide) thread pool: ``threads`` usable cores."""
    from executorch.extension.pybindings import portable_lib

    n = resolve_threads(threads)
    if portable_lib._threadpool_get_thread_count() != n:
        portable_lib._unsafe_reset_threadpool(n)


class ExecutorchBackend(Backend):
    name = "executorch"
    supports_prefix = True

    def __init__(self, root: Path, manifest: Manifest, threads: int | None = None, verbose: bool = False,
                 max_context: int | None = None):
        if manifest.target != "executorch":
            raise BundleError(f"{root}: a {manifest.target!r} bundle; the executorch backend reads ExecuTorch bundles")
        info = manifest.target_info
        self.n_ctx = context_limit(max_context, info.max_seq_len, "the .pte's static KV cache (max_seq_len)")
        self.torch, runtime = import_executorch()
        set_threads(threads)
        path = root / manifest.file("pte").path
        encoders, decoder = (self._load(runtime, path) for _ in range(2))  # see the module docstring
        missing = [m for m in METHODS if m not in encoders.method_names]
        if missing:
            raise BundleError(f"{path}: the program has no method {missing[0]} (it has "
                              f"{', '.join(sorted(encoders.method_names))})")
        self.methods = {"vision_encoder": encoders.load_method("vision_encoder"),
                        "token_embedding": encoders.load_method("token_embedding"),
                        "text_decoder": decoder.load_method("text_decoder")}
        self._programs = (encoders, decoder)
        self._pos = 0
        self._started = False

    @staticmethod
    def _load(runtime, path: Path):
        try:
            return runtime.load_program(path)
        except Exception as e:  # ExecuTorch raises RuntimeError with its error code
            raise BundleError(f"{path}: ExecuTorch cannot load it ({type(e).__name__}: {e})") from None

    def _run(self, method: str, *args) -> np.ndarray:
        out = self.methods[method].execute([self.torch.from_numpy(np.ascontiguousarray(a)) for a in args])
        return out[0].numpy()

    # --- the Backend interface -------------------------------------------------------------------

    def encode_image(self, pixel_values: np.ndarray) -> np.ndarray:
        x = np.asarray(pixel_values, dtype=np.float32)  # [B, 3, S, S]; the method takes batch 1
        return np.concatenate([self._run("vision_encoder", x[i:i + 1]) for i in range(x.shape[0])])  # [B, M, D]

    def _embed_segments(self, segments: Sequence[np.ndarray]) -> np.ndarray:
        total = self._pos + sum(len(s) for s in segments)
        if total > self.n_ctx:  # before any method runs: the methods' token axis ends at max_seq_len
            raise EdgeVLMError(f"{total} positions exceed the {self.n_ctx} the .pte's KV cache holds")
        parts = [s if is_visual_segment(s) else self._run("token_embedding", np.asarray(s, np.int64)[None])[0]
                 for s in segments]
        return np.concatenate([p.astype(np.float32, copy=False) for p in parts])[None]  # [1, T, D]

    def _step(self, x: np.ndarray) -> np.ndarray:
        """Run the decoder on ``x`` [1, T, D] at the positions after ``self._pos``; logits [V] of the last."""
        total = self._pos + x.shape[1]
        if total > self.n_ctx:
            raise EdgeVLMError(f"{total} positions exceed the {self.n_ctx} the .pte's KV cache holds")
        logits = self._run("text_decoder", x, np.array([self._pos], dtype=np.int64))  # [1, V]
        self._pos, self._started = total, True
        return np.asarray(logits[0], dtype=np.float32)

    def prefill(self, segments: Sequence[np.ndarray]) -> np.ndarray:
        self._pos, self._started = 0, False
        return self._step(self._embed_segments(segments))

    @property
    def n_past(self) -> int:
        return self._pos if self._started else 0

    def prefill_from(self, keep: int, segments: Sequence[np.ndarray]) -> np.ndarray:
        """Restart at position ``keep``: the cached positions before it stay, later ones are rewritten."""
        if not self._started or not 0 < keep <= self._pos:
            raise RuntimeError(f"cannot keep {keep} positions of a sequence of {self._pos}")
        self._pos = keep
        return self._step(self._embed_segments(segments))

    def decode(self, token_id: int) -> np.ndarray:
        if not self._started:
            raise RuntimeError("decode before prefill")
        return self._step(self._run("token_embedding", np.array([[token_id]], dtype=np.int64)))

    def close(self) -> None:
        self.methods, self._programs, self._started = {}, (), False


def _open(root: Path, manifest: Manifest, **options: Any) -> ExecutorchBackend:
    check_options("executorch", options, ())
    return ExecutorchBackend(root, manifest, **options)


BACKENDS.add("executorch", _open)
