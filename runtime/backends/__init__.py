"""Inference backends behind one small interface (``base.Backend``).

``BACKENDS`` maps a backend name ("ort", "llamacpp", "trt", ...) to a factory that opens a bundle;
each backend module registers itself when imported and imports its library lazily, so importing
this package needs neither torch nor any backend library. ``MODEL_DIR_BACKENDS`` maps a name to a
factory that opens a model dir or preset instead: ``(backend, tokenizer, manifest)``.

Higher layers register their own backends here; this package never imports or names them. The
``torch`` backend (the PyTorch model, the fidelity reference) lives in the model layer's
``torch_backend`` module and registers itself when imported (the ``edgevlm`` CLI does that for
``--backend torch``).
"""
from __future__ import annotations

from ..registry import Registry
from .base import Backend

_ABOVE = ("a backend of a layer above the runtime registers when its module is imported (torch: the "
          "model layer's torch_backend; the edgevlm CLI imports it for --backend torch)")
BACKENDS: Registry = Registry("backend", hint=_ABOVE)
MODEL_DIR_BACKENDS: Registry = Registry("backend for a model dir", hint=_ABOVE)

__all__ = ["BACKENDS", "MODEL_DIR_BACKENDS", "Backend"]

# This package's modules that register a backend when imported (their libraries load lazily).
BACKEND_MODULES = ("ort", "llamacpp", "trt")


def get_backend(name: str, registry: Registry = BACKENDS):
    """``registry.get(name)`` after loading this package's backends."""
    load_backend_modules()
    return registry.get(name)


def load_backend_modules() -> None:
    """Import every backend module present so that ``BACKENDS`` lists them all."""
    import importlib
    import importlib.util

    for name in BACKEND_MODULES:
        full = f"{__name__}.{name}"
        if importlib.util.find_spec(full) is not None:
            importlib.import_module(full)
