"""Inference backends behind one small interface (``base.Backend``).

``BACKENDS`` maps a backend name ("ort", "llamacpp", "trt", ...) to a factory that opens a bundle;
each backend module registers itself when imported and imports its library lazily, so importing
this package needs neither torch nor any backend library. ``MODEL_DIR_BACKENDS`` maps a name to a
factory that opens a model dir or preset instead: ``(backend, tokenizer, manifest)``.

Higher layers register their own backends here; this package never imports them. The ``torch``
backend (the PyTorch model, the fidelity reference) lives in the model layer,
``edgevlm.model.torch_backend``, and registers itself when imported (the ``edgevlm`` CLI does
that for ``--backend torch``).
"""
from __future__ import annotations

from ..registry import Registry
from .base import Backend

BACKENDS: Registry = Registry("backend")
MODEL_DIR_BACKENDS: Registry = Registry("backend for a model dir")

__all__ = ["BACKENDS", "MODEL_DIR_BACKENDS", "Backend"]

# This package's modules that register a backend when imported (their libraries load lazily).
BACKEND_MODULES = ("ort", "llamacpp", "trt")
# Backends a higher layer provides, and the module that registers each (named in errors, never imported).
PROVIDED_ABOVE = {"torch": "edgevlm.model.torch_backend"}


def get_backend(name: str, registry: Registry = BACKENDS):
    """``registry.get(name)`` after loading this package's backends; a backend a higher layer
    provides but nobody imported gets an error that says which module registers it."""
    load_backend_modules()
    if name not in registry and name in PROVIDED_ABOVE:
        from ..errors import EdgeVLMError

        raise EdgeVLMError(f"the {name} backend is registered by {PROVIDED_ABOVE[name]}: import it first "
                           f"(the edgevlm CLI does for --backend {name})")
    return registry.get(name)


def load_backend_modules() -> None:
    """Import every backend module present so that ``BACKENDS`` lists them all."""
    import importlib
    import importlib.util

    for name in BACKEND_MODULES:
        full = f"{__name__}.{name}"
        if importlib.util.find_spec(full) is not None:
            importlib.import_module(full)
