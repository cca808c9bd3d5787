"""Inference backends behind one small interface (``base.Backend``), and which one reads a bundle.

``BACKENDS`` maps a backend name to a factory ``(root, manifest, **options) -> Backend`` that opens a
bundle; ``MODEL_DIR_BACKENDS`` maps a name to a factory that opens a model dir or preset instead and
returns the whole ``Runtime``. Both are lazy (``registry.Registry``): the table below names the
module that provides each backend, and the first ``get`` imports it (the module registers itself).
A backend module imports its library (onnxruntime, llama_cpp, tensorrt) only when a bundle is
opened, so importing this package needs neither torch nor any backend library.

The ``torch`` backend (the PyTorch model, the fidelity reference) belongs to the model layer. This
package never names it: the ``edgevlm`` package, above every layer, provides it
(``provide_backend``) as a module to import on first use, so ``Runtime.load(model_dir,
backend="torch")`` works from Python while the runtime depends on nothing above it
(tests/test_layers.py checks both).

The bundle says which backend reads it: ``TARGET_BACKENDS`` maps the manifest's ``target`` to it;
``torch`` also opens any bundle that records the model it was exported from.
"""
from __future__ import annotations

from ..errors import BundleError, EdgeVLMError
from ..registry import Registry
from .base import COMMON_OPTIONS, Backend

# this package's backends -> the module that registers each when imported
BACKEND_MODULES = {"ort": f"{__name__}.ort", "llamacpp": f"{__name__}.llamacpp", "trt": f"{__name__}.trt",
                   "executorch": f"{__name__}.executorch"}
MODEL_DIR_BACKEND = "torch"  # the backend of a path without manifest.json (a model dir or preset)
# a bundle's manifest target -> the backend that reads it (the TensorRT target has had two spellings)
TARGET_BACKENDS = {"onnx": "ort", "gguf": "llamacpp", "trt": "trt", "tensorrt": "trt", "executorch": "executorch"}
ANY_BUNDLE = ("torch",)  # read every bundle: the PyTorch model it was exported from, the reference

_HINT = "torch needs PyTorch (pip install 'edgevlm[train]')"
BACKENDS: Registry = Registry("backend", hint=_HINT, modules=BACKEND_MODULES)
MODEL_DIR_BACKENDS: Registry = Registry("backend", hint=_HINT)  # a model dir or preset

__all__ = ["BACKENDS", "MODEL_DIR_BACKENDS", "COMMON_OPTIONS", "Backend", "backend_for", "get_backend",
           "provide_backend"]


def provide_backend(name: str, module: str, model_dir: bool = False) -> None:
    """A backend that a layer above the runtime provides: ``module`` registers it when first asked
    for (in ``MODEL_DIR_BACKENDS`` too with ``model_dir``: it opens model dirs and presets)."""
    BACKENDS.provide(name, module)
    if model_dir:
        MODEL_DIR_BACKENDS.provide(name, module)


def get_backend(name: str, registry: Registry = BACKENDS):
    """The factory of backend ``name``, its module imported on first use."""
    return registry.get(name)


def backend_for(target: str, backend: str | None = None, where: str = "bundle") -> str:
    """The backend that reads a bundle of ``target``: ``backend`` when given and able to, else the
    target's own. An explicit backend that cannot read it is refused, naming the one that can."""
    own = TARGET_BACKENDS.get(target)
    if backend is None:
        if own is None:
            raise BundleError(f"{where}: a {target!r} bundle, which no runtime backend here runs "
                              f"(backends read: {', '.join(sorted(TARGET_BACKENDS))})"
                              + ("; a Core ML bundle runs in Core ML on macOS/iOS" if target == "coreml" else ""))
        return own
    get_backend(backend)  # an unknown name is refused with the valid ones first
    if backend != own and backend not in ANY_BUNDLE:
        reader = f"backend={own!r}" if own else "no runtime backend here"
        raise EdgeVLMError(f"{where}: a {target!r} bundle; the {backend} backend cannot read it ({reader} does; "
                           f"leave the backend out to use the bundle's own)")
    return backend


def load_backend_modules() -> None:
    """Import this package's own backend modules, so that ``BACKENDS.items()`` lists them."""
    for name, module in BACKEND_MODULES.items():
        if module.startswith(f"{__name__}."):
            BACKENDS.get(name)
