"""``Runtime``: a loaded bundle + backend + processor (tokenizer, template, preprocessing), driving
the one generation loop.

    from edgevlm.runtime import Runtime
    rt = Runtime.load("bundles/tiny-onnx")      # the backend from the manifest (here: ort)
    r = rt.generate("photo.jpg", "What colour is the car?", max_new_tokens=32)
    r.text, r.token_ids, r.timings
    for piece in rt.stream(image, prompt): ...
    rt.generate(image, "How many?", json_schema={...}, logprobs=True, top_logprobs=3)   # see generation_config
    Runtime.load("runs/tiny/final")              # a model dir or preset: the PyTorch model (torch)
    Runtime.load("bundles/tiny-gguf", threads=2, max_context=1024)   # options: see Runtime.load

Caches (``runtime.cache``): an image-embedding cache (``image_cache_mb``, default 64 MB; 0 = off)
and, with ``prefix_reuse=True``, KV prefix reuse on backends that support it: a follow-up turn
about the same image neither re-encodes the image nor prefills the shared prefix again.
``r.cache`` says what a call took from them. Prefix reuse is off by default because a prefix
computed in an earlier call can differ from a fresh prefill in the last float bits.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .backends import MODEL_DIR_BACKEND, MODEL_DIR_BACKENDS, backend_for, get_backend
from .cache import DEFAULT_IMAGE_CACHE_MB, Caches, ImageCache, PrefixCache
from .constrain import constraint_from
from .generate import GenerationConfig, GenerationResult, Stream, generate, stream
from .errors import BundleError, EdgeVLMError
from .manifest import MANIFEST, Manifest, read_manifest
from .preprocess import DEFAULT_MAX_PIXELS
from .processor import Processor
from .tokenizer import TextTokenizer


class Runtime:
    def __init__(self, backend, tokenizer: TextTokenizer, manifest: Manifest, root: Path,
                 image_cache_mb: float = DEFAULT_IMAGE_CACHE_MB, prefix_reuse: bool = False):
        self.backend = backend
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.processor = Processor.create(tokenizer, manifest.chat_template, manifest.preprocess)
        self.root = root
        self.caches = Caches(images=ImageCache(int(image_cache_mb * (1 << 20))) if image_cache_mb > 0 else None,
                             prefix=PrefixCache() if prefix_reuse else None)

    @classmethod
    def load(cls, path: str | os.PathLike, backend: str | None = None, verify: bool = True,
             image_cache_mb: float = DEFAULT_IMAGE_CACHE_MB, prefix_reuse: bool = False,
             **options: Any) -> "Runtime":
        """Open a bundle (a dir with manifest.json), a model dir or a preset name.

        ``backend``: None = the bundle's own (its manifest's target: onnx -> ort, gguf -> llamacpp,
        trt -> trt; a model dir or preset -> torch); a named backend that cannot read the bundle is
        refused with the one that can. ``options``: the common ``threads``, ``verbose``,
        ``max_context`` (``backends.base.COMMON_OPTIONS``) and the backend's own; every backend
        refuses options it does not know, listing the valid ones.
        """
        root = Path(path)
        caching = dict(image_cache_mb=image_cache_mb, prefix_reuse=prefix_reuse)
        if backend is not None:
            get_backend(backend)  # an unknown backend is refused before any file is read
        if not (root / MANIFEST).is_file():
            return cls._load_model_dir(root, backend, caching, options)
        manifest = read_manifest(root, verify=verify)
        be = get_backend(backend_for(manifest.target, backend, str(root)))(root, manifest, **options)
        tok = TextTokenizer.from_dir(root, bos_id=manifest.tokens.bos_id, eos_id=manifest.tokens.eos_id)
        return cls(be, tok, manifest, root, **caching)

    @classmethod
    def _load_model_dir(cls, root: Path, backend: str | None, caching: dict, options: dict) -> "Runtime":
        """A path without manifest.json: a model dir or preset, which only ``torch`` opens."""
        name = MODEL_DIR_BACKEND if backend is None else backend
        if name not in MODEL_DIR_BACKENDS:
            raise BundleError(f"{root}: not a bundle (no {MANIFEST}); the {name} backend reads bundles (export "
                              f"one with edgevlm export), a model dir or preset runs with backend={MODEL_DIR_BACKEND!r}")
        try:
            return MODEL_DIR_BACKENDS.get(name)(root, **caching, **options)
        except EdgeVLMError as e:
            if backend is not None:
                raise
            raise BundleError(f"{root}: not a bundle (no {MANIFEST}); as a model dir or preset "
                              f"({MODEL_DIR_BACKEND} backend): {e}") from None

    def prompt_ids(self, prompt: str, with_image: bool) -> list[int]:
        return self.processor.prompt_ids(prompt, with_image)

    def chat_ids(self, turns, system: str | None = None) -> list[int]:
        """Prompt ids of a conversation [(question, answer-or-None)] (``<image>`` marks an image);
        ``system`` replaces the template's system prompt."""
        return self.processor.chat_ids(turns, system)

    def pixel_values(self, image, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        return self.processor.pixel_values(image, max_pixels)  # [1, 3, S, S]

    def generate(self, image=None, prompt: str = "", max_new_tokens: int = 32, **gen: Any) -> GenerationResult:
        """Answer ``prompt`` (about ``image``); ``gen``: see ``generation_config``."""
        config = generation_config(max_new_tokens, **gen)
        ids, pixels = self.processor(image, prompt)
        return generate(self.backend, self.tokenizer, ids, pixels, config, self.caches)

    def stream(self, image=None, prompt: str = "", max_new_tokens: int = 32, **gen: Any) -> Stream:
        config = generation_config(max_new_tokens, **gen)
        ids, pixels = self.processor(image, prompt)
        return stream(self.backend, self.tokenizer, ids, pixels, config, self.caches)

    def stream_ids(self, prompt_ids, pixels: np.ndarray | None, config: GenerationConfig) -> Stream:
        """``stream`` for prepared inputs (``chat_ids``, ``pixel_values``), with this Runtime's caches."""
        return stream(self.backend, self.tokenizer, prompt_ids, pixels, config, self.caches)

    def watch(self, source: str, prompt: str, **options: Any):
        """Ask ``prompt`` about the frames of a video file, stream URL or camera: an iterator of
        per-frame ``WatchResult`` (options and bounds: ``runtime.watch.watch``; needs PyAV)."""
        from .watch import watch

        return watch(self, source, prompt, **options)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def generation_config(max_new_tokens: int = 32, json_schema: dict | str | None = None, json_object: bool = False,
                      regex: str | None = None, choices=None, strict: bool = True, constraint=None,
                      **gen: Any) -> GenerationConfig:
    """``GenerationConfig`` from ``Runtime.generate``'s keywords: at most one of ``json_schema`` (dict or
    JSON text; ``strict``), ``json_object``, ``regex``, ``choices``, ``constraint`` (runtime.constrain); ``logprobs``,
    ``top_logprobs``, ``stop``, ``ignore_eos``; and the SamplingConfig fields (``do_sample``,
    ``temperature``, ``top_k``, ``top_p``, ``seed``, ``repetition_penalty``, ``logit_bias``,
    ``presence_penalty``, ``frequency_penalty``)."""
    constraint = constraint_from(json_schema, json_object, regex, choices, strict, constraint)
    return GenerationConfig(max_new_tokens=max_new_tokens, constraint=constraint, **gen)
