"""Inference backends behind one small interface (``base.Backend``).

``BACKENDS`` maps a backend name ("ort", "llamacpp", "trt", "torch", ...) to a factory that opens a
bundle; each backend module registers itself when imported and imports its library lazily, so
importing this package needs neither torch nor any backend library.
"""
from __future__ import annotations

from ..registry import Registry
from .base import Backend

BACKENDS: Registry = Registry("backend")

__all__ = ["BACKENDS", "Backend"]

# Modules that register a backend when imported (their libraries load lazily, on first use).
BACKEND_MODULES = ("ort", "llamacpp", "trt", "torch")


def load_backend_modules() -> None:
    """Import every backend module present so that ``BACKENDS`` lists them all."""
    import importlib
    import importlib.util

    for name in BACKEND_MODULES:
        full = f"{__name__}.{name}"
        if importlib.util.find_spec(full) is not None:
            importlib.import_module(full)
