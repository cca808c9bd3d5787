"""Benchmarks: run a matrix, write the latency report, project onto target devices.

    edgevlm bench run --matrix smoke --out results.jsonl
    edgevlm bench report results.jsonl --out report/
    edgevlm bench project [results.jsonl] [--validate]
    edgevlm bench study --base runs/tiny/final      # integrator accuracy-latency study
    edgevlm bench profile BUNDLE                    # an ONNX bundle's time per stage and operator

Each is also a script: python benchmarks/run.py, report.py, projection.py, study_integrators.py,
profile_ort.py.
"""
from __future__ import annotations

import argparse
import importlib

STEPS = {"run": "edgevlm.benchmarks.run", "report": "edgevlm.benchmarks.report",
         "project": "edgevlm.benchmarks.projection", "study": "edgevlm.benchmarks.study_integrators",
         "profile": "edgevlm.benchmarks.profile_ort"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="step", metavar="STEP", required=True)
    for name, module_name in STEPS.items():
        module = importlib.import_module(module_name)
        sp = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0], description=module.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sp)
        sp.set_defaults(_step_run=module.run)


def run(args: argparse.Namespace) -> int:
    return args._step_run(args)
