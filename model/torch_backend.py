"""Backend ``torch``: the PyTorch model behind the runtime interface (the fidelity reference).

It belongs to the model layer, not to ``runtime/`` (which never imports torch or anything above
it): importing this module registers ``torch`` in ``runtime.backends.BACKENDS`` (a bundle: the model
it was exported from) and ``MODEL_DIR_BACKENDS`` (a model dir or preset). The runtime's backend
table names this module, so ``Runtime.load(path, backend="torch")`` imports it on first use.
``torch_runtime(model)`` is the one place a ``Runtime`` over an in-memory PyTorch model is built.

Options (``Runtime.load(path, backend="torch", **options)``): the common ``threads`` (PyTorch's
intra-op threads, ``torch.set_num_threads``: one pool per process, so this sets it for the whole
process), ``verbose`` (no effect: PyTorch keeps no log of its own here), ``max_context``; and
``device`` (``cpu`` default, ``cuda``...).

Integrators that condition the LLM per image (vlora's weight deltas, gated_prefix's prompts) give
zero visual tokens; ``encode_image`` keeps their per-image weights, and ``prefill`` and every
``decode`` of that sequence run the LLM conditioned on the weights of the images it holds.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch  # at import: without PyTorch the runtime's registry refuses backend 'torch' naming the extra

from edgevlm.runtime.backends import BACKENDS, MODEL_DIR_BACKENDS
from edgevlm.runtime.backends.base import Backend, check_options, context_limit, is_visual_segment
from edgevlm.runtime.cache import DEFAULT_IMAGE_CACHE_MB
from edgevlm.runtime.engine import Runtime
from edgevlm.runtime.errors import BundleError
from edgevlm.runtime.hostcpu import resolve_threads


class TorchBackend(Backend):
    name = "torch"
    cacheable_images = False  # encode_image keeps per-image LLM weights for the next prefill

    def __init__(self, model, device: str | None = None):
        self.torch = torch
        self.model = model.eval()
        if device is not None:
            self.model.to(device)
        self.n_ctx = model.cfg.llm.max_position_embeddings
        self._past = None
        self._image_weights = None  # [B, ...] from the last encode_image (None: integrator has none)
        self._weights: tuple = (None, [0])  # (weights, counts) this sequence's LLM calls are conditioned on

    def encode_image(self, pixel_values: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            out, self._image_weights = self.model.encode(self.torch.from_numpy(np.ascontiguousarray(pixel_values)))
        return out.float().cpu().numpy()  # [B, M, D]; M = 0 for vlora / gated_prefix

    def prefill(self, segments: Sequence[np.ndarray]) -> np.ndarray:
        t = self.torch
        emb = self.model.llm.get_input_embeddings()
        dev, dtype = emb.weight.device, emb.weight.dtype
        with t.inference_mode():
            parts = [t.from_numpy(np.ascontiguousarray(s)).to(dev, dtype) if is_visual_segment(s)
                     else emb(t.from_numpy(np.asarray(s, dtype=np.int64)).to(dev)) for s in segments]
            x = t.cat(parts, dim=0)[None]  # [1, T, D]; a visual segment may be [0, D]
            self._weights = self._sequence_weights(segments)
            with self.model.conditioned(*self._weights):
                out = self.model.llm(inputs_embeds=x, use_cache=True, logits_to_keep=1)  # last position only
        self._past = out.past_key_values
        return out.logits[0, -1].float().cpu().numpy()

    def decode(self, token_id: int) -> np.ndarray:
        t = self.torch
        if self._past is None:
            raise RuntimeError("decode before prefill")
        with t.inference_mode():
            ids = t.tensor([[token_id]], device=self.model.llm.get_input_embeddings().weight.device)
            with self.model.conditioned(*self._weights):
                out = self.model.llm(input_ids=ids, past_key_values=self._past, use_cache=True)
        self._past = out.past_key_values
        return out.logits[0, -1].float().cpu().numpy()

    def _sequence_weights(self, segments: Sequence[np.ndarray]) -> tuple:
        """(per-image weights, [n images]) for a sequence: the images of the last encode_image,
        which the shared loop calls right before prefill with exactly this sequence's images."""
        n = sum(1 for s in segments if is_visual_segment(s))
        weights, self._image_weights = self._image_weights, None
        if not n or weights is None:
            return None, [0]
        if weights.shape[0] != n:
            raise RuntimeError(f"prefill holds {n} image(s) but the last encode_image had {weights.shape[0]}")
        return weights, [n]

    def close(self) -> None:
        self._past = self._image_weights = None
        self._weights = (None, [0])


OPTIONS = ("device",)


def open_model(model, device: str | None = None, threads: int | None = None, verbose: bool = False,
               max_context: int | None = None) -> TorchBackend:
    """``model`` behind the backend interface, with the runtime's options applied."""
    del verbose  # accepted like every backend's; nothing to show
    torch.set_num_threads(resolve_threads(threads))
    backend = TorchBackend(model, device)
    backend.n_ctx = context_limit(max_context, backend.n_ctx, "the model (llm.max_position_embeddings)")
    return backend


def torch_runtime(model, root: str | os.PathLike = ".", image_cache_mb: float = DEFAULT_IMAGE_CACHE_MB,
                  prefix_reuse: bool = False, **options) -> Runtime:
    """A ``Runtime`` over the PyTorch ``model`` itself (no bundle); ``options`` as ``Runtime.load``'s."""
    from .summary import base_manifest

    check_options("torch", options, OPTIONS)
    manifest = base_manifest(model, "torch", [], "edgevlm.torch")
    return Runtime(open_model(model, **options), model.tokenizer, manifest, Path(root),
                   image_cache_mb=image_cache_mb, prefix_reuse=prefix_reuse)


def open_model_dir(root, image_cache_mb: float = DEFAULT_IMAGE_CACHE_MB, prefix_reuse: bool = False,
                   **options) -> Runtime:
    """``Runtime.load`` of an edgevlm model dir, an official MobileVLM dir or a preset: the reference path."""
    from .load import load_model

    check_options("torch", options, OPTIONS)  # before the slow load
    return torch_runtime(load_model(str(root)), root, image_cache_mb, prefix_reuse, **options)


def _open_bundle(root, manifest, **options) -> TorchBackend:
    """A bundle exported from a model dir or preset records it in ``target_info.source``; load that."""
    from .load import load_model

    check_options("torch", options, OPTIONS)
    src = getattr(manifest.target_info, "source", "")  # a TensorRT bundle records only its ONNX bundle
    if not src:
        raise BundleError(f"{root}: bundle does not record its source model; pass the model dir instead")
    return open_model(load_model(src), **options)


BACKENDS.add("torch", _open_bundle)
MODEL_DIR_BACKENDS.add("torch", open_model_dir)
