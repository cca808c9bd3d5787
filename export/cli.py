"""Export a model to a deployment bundle: onnx | gguf | trt | coreml.

Each target is a script too: python export/to_onnx.py, export/to_gguf.py, export/to_trt.py,
export/to_coreml.py (same arguments as ``edgevlm export <target>``).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util

from edgevlm.runtime.registry import Registry

# target -> module with add_arguments(parser) and run(args); modules keep heavy imports inside run()
EXPORTERS: Registry[str] = Registry("export target")
for _target in ("onnx", "gguf", "trt", "coreml"):
    EXPORTERS.add(_target, f"edgevlm.export.to_{_target}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="target", metavar="TARGET", required=True)
    for name, module_name in EXPORTERS.items():
        if importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)
        sp = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0],
                            description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sp)
        sp.set_defaults(_target_run=module.run)


def run(args: argparse.Namespace) -> int:
    return args._target_run(args)
