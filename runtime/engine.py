"""``Runtime``: a loaded bundle + backend + processor (tokenizer, template, preprocessing), driving
the one generation loop.

    from edgevlm.runtime import Runtime
    rt = Runtime.load("bundles/tiny-onnx", backend="ort")
    r = rt.generate("photo.jpg", "What colour is the car?", max_new_tokens=32)
    r.text, r.token_ids, r.timings
    for piece in rt.stream(image, prompt): ...

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

from .backends import MODEL_DIR_BACKENDS, get_backend
from .cache import DEFAULT_IMAGE_CACHE_MB, Caches, ImageCache, PrefixCache
from .generate import GenerationConfig, GenerationResult, Stream, generate, stream
from .manifest import Manifest, read_manifest
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
    def load(cls, bundle: str | os.PathLike, backend: str = "ort", verify: bool = True,
             image_cache_mb: float = DEFAULT_IMAGE_CACHE_MB, prefix_reuse: bool = False,
             **options: Any) -> "Runtime":
        """Open ``bundle`` with the named backend; ``options`` go to the backend (threads, providers...)."""
        root = Path(bundle)
        caching = dict(image_cache_mb=image_cache_mb, prefix_reuse=prefix_reuse)
        factory = get_backend(backend)  # an unknown backend is refused before any file is read
        if not (root / "manifest.json").is_file() and backend in MODEL_DIR_BACKENDS:
            be, tok, manifest = MODEL_DIR_BACKENDS.get(backend)(root)  # a model dir or preset
            return cls(be, tok, manifest, root, **caching)
        manifest = read_manifest(root, verify=verify)
        be = factory(root, manifest, **options)
        tok = TextTokenizer.from_dir(root, bos_id=manifest.tokens["bos_id"], eos_id=manifest.tokens["eos_id"])
        return cls(be, tok, manifest, root, **caching)

    def prompt_ids(self, prompt: str, with_image: bool) -> list[int]:
        return self.processor.prompt_ids(prompt, with_image)

    def chat_ids(self, turns, system: str | None = None) -> list[int]:
        """Prompt ids of a conversation [(question, answer-or-None)] (``<image>`` marks an image);
        ``system`` replaces the template's system prompt."""
        return self.processor.chat_ids(turns, system)

    def pixel_values(self, image, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        return self.processor.pixel_values(image, max_pixels)  # [1, 3, S, S]

    def generate(self, image=None, prompt: str = "", max_new_tokens: int = 32, **gen: Any) -> GenerationResult:
        ids, pixels = self.processor(image, prompt)
        config = GenerationConfig(max_new_tokens=max_new_tokens, **gen)
        return generate(self.backend, self.tokenizer, ids, pixels, config, self.caches)

    def stream(self, image=None, prompt: str = "", max_new_tokens: int = 32, **gen: Any) -> Stream:
        ids, pixels = self.processor(image, prompt)
        config = GenerationConfig(max_new_tokens=max_new_tokens, **gen)
        return stream(self.backend, self.tokenizer, ids, pixels, config, self.caches)

    def stream_ids(self, prompt_ids, pixels: np.ndarray | None, config: GenerationConfig) -> Stream:
        """``stream`` for prepared inputs (``chat_ids``, ``pixel_values``), with this Runtime's caches."""
        return stream(self.backend, self.tokenizer, prompt_ids, pixels, config, self.caches)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
