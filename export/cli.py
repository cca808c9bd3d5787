"""Export a model to a deployment bundle: onnx | gguf | trt | coreml | executorch.

Each target is a script too: python export/to_onnx.py, export/to_gguf.py, export/to_trt.py,
export/to_coreml.py, export/to_executorch.py (same arguments as ``edgevlm export <target>``).
"""
from __future__ import annotations

import argparse

from edgevlm.runtime.registry import Registry
from edgevlm.runtime.subcommands import add_subcommands

# target -> module with add_arguments(parser) and run(args); modules keep heavy imports inside run()
EXPORTERS: Registry[str] = Registry("export target")
for _target in ("onnx", "gguf", "trt", "coreml", "executorch"):
    EXPORTERS.add(_target, f"edgevlm.export.to_{_target}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_subcommands(p, dict(EXPORTERS.items()), "target", "TARGET")  # the target's module runs it
