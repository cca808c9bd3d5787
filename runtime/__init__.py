"""The torch-free on-device runtime: bundles, preprocessing, tokenizer, one generation loop, backends.

Depends only on numpy, Pillow, tokenizers and PyYAML (``configio``: manifests and configs), plus each
backend's own library, imported lazily: ``pip install 'edgevlm[ort]'`` (or ``[llamacpp]``, ``[trt]``).
"""
from __future__ import annotations

__all__ = ["Runtime", "GenerationConfig", "GenerationResult", "SamplingConfig", "EdgeVLMError"]


def __getattr__(name: str):
    if name == "Runtime":
        from .engine import Runtime

        return Runtime
    if name in ("GenerationConfig", "GenerationResult"):
        from . import generate

        return getattr(generate, name)
    if name == "SamplingConfig":
        from .sampling import SamplingConfig

        return SamplingConfig
    if name == "EdgeVLMError":
        from .errors import EdgeVLMError

        return EdgeVLMError
    raise AttributeError(name)
