"""``Runtime``: a loaded bundle + backend + tokenizer + preprocessing, driving the one generation loop.

    from edgevlm.runtime import Runtime
    rt = Runtime.load("bundles/tiny-onnx", backend="ort")
    r = rt.generate("photo.jpg", "What colour is the car?", max_new_tokens=32)
    r.text, r.token_ids, r.timings
    for piece in rt.stream(image, prompt): ...
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .backends import BACKENDS, load_backend_modules
from .chat import IMAGE_TOKEN, TEMPLATES
from .generate import GenerationConfig, GenerationResult, Stream, generate, stream
from .manifest import Manifest, read_manifest
from .preprocess import load_image, preprocess_image
from .tokenizer import TextTokenizer


class Runtime:
    def __init__(self, backend, tokenizer: TextTokenizer, manifest: Manifest, root: Path):
        self.backend = backend
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.root = root

    @classmethod
    def load(cls, bundle: str | os.PathLike, backend: str = "ort", verify: bool = True, **options: Any) -> "Runtime":
        """Open ``bundle`` with the named backend; ``options`` go to the backend (threads, providers...)."""
        root = Path(bundle)
        if backend == "torch" and not (root / "manifest.json").is_file():
            from .backends.torch import open_model_dir  # a model dir or preset: the torch reference

            be, tok, manifest = open_model_dir(root)
            return cls(be, tok, manifest, root)
        manifest = read_manifest(root, verify=verify)
        load_backend_modules()
        factory = BACKENDS.get(backend)
        be = factory(root, manifest, **options)
        tok = TextTokenizer.from_dir(root, bos_id=manifest.tokens["bos_id"], eos_id=manifest.tokens["eos_id"])
        return cls(be, tok, manifest, root)

    def prompt_ids(self, prompt: str, with_image: bool) -> list[int]:
        if with_image and IMAGE_TOKEN not in prompt:
            prompt = f"{IMAGE_TOKEN}\n{prompt}"
        return self.tokenizer.encode_chat(TEMPLATES[self.manifest.chat_template], [(prompt, None)])

    def pixel_values(self, image) -> np.ndarray:
        return preprocess_image(load_image(image), self.manifest.preprocess)

    def _inputs(self, image, prompt: str):
        pixels = None if image is None else self.pixel_values(image)
        return self.prompt_ids(prompt, image is not None), pixels

    def generate(self, image=None, prompt: str = "", max_new_tokens: int = 32, **gen: Any) -> GenerationResult:
        ids, pixels = self._inputs(image, prompt)
        return generate(self.backend, self.tokenizer, ids, pixels, GenerationConfig(max_new_tokens=max_new_tokens, **gen))

    def stream(self, image=None, prompt: str = "", max_new_tokens: int = 32, **gen: Any) -> Stream:
        ids, pixels = self._inputs(image, prompt)
        return stream(self.backend, self.tokenizer, ids, pixels, GenerationConfig(max_new_tokens=max_new_tokens, **gen))

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
