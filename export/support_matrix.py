"""The export support matrix (integrator x target), generated from the registries.

    python -m edgevlm.export.support_matrix        # prints the Markdown table for the README

Each cell is either supported (and parity- or spec-tested by the test named in the legend) or the
reason the exporter refuses it. Integrators declare GGUF support with ``gguf_projector``; ONNX,
TensorRT (through the ONNX graphs and the parser's operator list) and Core ML convert every
registered integrator, which ``tests/test_onnx_export.py``, ``tests/test_trt.py`` and
``tests/test_coreml.py`` check by parametrising over the registry.
"""
from __future__ import annotations

TARGETS = ("onnx", "tensorrt", "gguf", "coreml")
LEGEND = {
    "onnx": "torch vs ONNX Runtime parity (tests/test_onnx_export.py)",
    "tensorrt": "every op in TensorRT 10.3's ONNX parser list (tests/test_trt.py); engine parity runs where TensorRT exists",
    "gguf": "mmproj embeddings vs torch, cosine >= 0.999 (tests/test_llamacpp_backend.py)",
    "coreml": "conversion + spec checks on Linux (tests/test_coreml.py); predictions on macOS",
}


def support(name: str) -> dict[str, str]:
    """target -> 'yes (projector type)' or 'no: reason' for integrator ``name``."""
    from edgevlm.train.integrators import INTEGRATORS

    cls = INTEGRATORS.get(name)
    proj = getattr(cls, "gguf_projector", None)
    gguf = f"yes (`{proj}`)" if proj else "no: llama.cpp has no projector type for it"
    return {"onnx": "yes", "tensorrt": "yes", "gguf": gguf, "coreml": "yes"}


def markdown() -> str:
    from edgevlm.train.integrators import INTEGRATORS

    rows = ["| integrator | " + " | ".join(TARGETS) + " |", "|---" * (len(TARGETS) + 1) + "|"]
    for name in INTEGRATORS.names():
        cells = support(name)
        rows.append(f"| `{name}` | " + " | ".join(cells[t] for t in TARGETS) + " |")
    rows.append("")
    rows += [f"- {t}: {LEGEND[t]}" for t in TARGETS]
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown())
