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

from edgevlm.runtime.subcommands import add_subcommands

STEPS = {"run": "edgevlm.benchmarks.run", "report": "edgevlm.benchmarks.report",
         "project": "edgevlm.benchmarks.projection", "study": "edgevlm.benchmarks.study_integrators",
         "profile": "edgevlm.benchmarks.profile_ort"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_subcommands(p, STEPS, "step", "STEP")  # the step's module runs it
