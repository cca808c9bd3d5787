"""edgevlm: train MobileVLM-style vision-language models and run them on Jetson boards and phones.

Subpackages map to the checkout's top-level folders, lowest layer first: ``edgevlm.runtime``
(runtime/, torch-free), ``edgevlm.model`` (model/), ``edgevlm.train`` (train/), ``edgevlm.export``
(export/), ``edgevlm.benchmarks`` (benchmarks/).
Importing ``edgevlm`` itself stays light: torch is only imported when ``load_model`` is used.
"""
from edgevlm.runtime.backends import MODEL_DIR_BACKEND, provide_backend
from edgevlm.runtime.errors import EdgeVLMError

# The model layer's torch backend (PyTorch, the fidelity reference), imported on first use: the
# runtime names nothing above it, so this package, above every layer, wires it in.
provide_backend(MODEL_DIR_BACKEND, "edgevlm.model.torch_backend", model_dir=True)

__version__ = "0.1.0"
__all__ = ["load_model", "EdgeVLMError", "__version__"]


def load_model(name_or_path, dtype=None, **overrides):
    """An edgevlm checkpoint dir, an official MobileVLM dir, or a preset name (random weights)."""
    from edgevlm.model.load import load_model as _load

    return _load(name_or_path, dtype=dtype, **overrides)
