"""The export support matrix (integrator x target), generated from the registries.

    python -m edgevlm.export.support_matrix                      # prints the Markdown table
    python -m edgevlm.export.support_matrix --update docs/export.md   # rewrites it in docs/export.md

Each cell is either supported (and parity- or spec-tested by the test named in the legend) or the
reason the exporter refuses it. Integrators declare GGUF support with ``gguf_projector`` and
refusals with ``export_refusals`` (``edgevlm.model.integrators.export_refusal``); the exporters
call ``export.common.require_exportable`` so the matrix and the tools cannot disagree. The export
tests parametrise over the registry: every "yes" cell is converted and checked, every "no" cell
must be refused with its reason.
"""
from __future__ import annotations

LEGEND = {
    "onnx": "torch vs ONNX Runtime parity (tests/test_onnx_export.py)",
    "trt": "TensorRT engines: every op in TensorRT 10.3's ONNX parser list (tests/test_trt.py); engine parity runs where TensorRT exists",
    "gguf": "mmproj embeddings vs torch, cosine >= 0.999 (tests/test_llamacpp_backend.py)",
    "coreml": "conversion + spec checks on Linux (tests/test_coreml.py); predictions on macOS",
    "executorch": "per-method checks vs PyTorch in ExecuTorch, ExecuTorch's MultimodalRunner = the executorch "
                  "backend's greedy tokens (tests/test_executorch.py; token integrators: tests/test_executorch_integrators.py)",
}


def support(name: str) -> dict[str, str]:
    """target -> 'yes (projector type)' or 'no: reason' for integrator ``name``."""
    from edgevlm.model.integrators import EXPORT_TARGETS, INTEGRATORS, export_refusal

    out = {}
    for t in EXPORT_TARGETS:
        reason = export_refusal(name, t)
        out[t] = f"no: {reason}" if reason else "yes"
    proj = getattr(INTEGRATORS.get(name), "gguf_projector", None)
    if out["gguf"] == "yes":
        out["gguf"] = f"yes (`{proj}`)"
    return out


def markdown() -> str:
    from edgevlm.model.integrators import EXPORT_TARGETS as TARGETS, INTEGRATORS

    rows = ["| integrator | " + " | ".join(TARGETS) + " |", "|---" * (len(TARGETS) + 1) + "|"]
    for name in INTEGRATORS.names():
        cells = support(name)
        rows.append(f"| `{name}` | " + " | ".join(cells[t] for t in TARGETS) + " |")
    rows.append("")
    rows += [f"- {t}: {LEGEND[t]}" for t in TARGETS]
    return "\n".join(rows)


def update_readme(path: str) -> bool:
    """Replace the matrix (table + legend) in the Markdown file ``path``; True if it changed."""
    from pathlib import Path

    text = Path(path).read_text()
    lines = text.splitlines(keepends=True)
    start = next(i for i, l in enumerate(lines) if l.startswith("| integrator | onnx"))
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("#")), len(lines))  # next heading
    new = "".join(lines[:start]) + markdown() + "\n\n" + "".join(lines[end:])
    Path(path).write_text(new)
    return new != text


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--update"]:
        print("updated" if update_readme(sys.argv[2]) else "unchanged", sys.argv[2])
    else:
        print(markdown())
