"""Subcommands from a name -> module table: the one dispatcher behind ``edgevlm COMMAND``,
``edgevlm export TARGET`` and ``edgevlm bench STEP``.

A module in a table defines ``add_arguments(parser)`` and, unless it adds subcommands of its own,
``run(args) -> int | None``; its docstring's first line is its help, the whole docstring its
description. ``run_command(args)`` calls the ``run`` of the innermost subcommand parsed. With
``only``, just that subcommand's module is imported (the others are listed from their docstrings,
read without importing them), so ``edgevlm run`` never imports torch.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
from typing import Mapping


def summary(module_name: str) -> str:
    """The first line of a module's docstring, read without importing the module (keeps --help fast)."""
    spec = importlib.util.find_spec(module_name)
    with open(spec.origin) as f:
        text = f.read()
    doc = text.split('"""')[1] if '"""' in text else ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def add_subcommands(parser: argparse.ArgumentParser, table: Mapping[str, str], dest: str,
                    metavar: str = "COMMAND", only: str | None = None) -> None:
    """One subcommand of ``parser`` per ``table`` entry (name -> module), in table order; modules not
    present in this checkout are left out. ``only``: import just that subcommand's module."""
    sub = parser.add_subparsers(dest=dest, metavar=metavar, required=True)
    for name, module_name in table.items():
        try:
            if importlib.util.find_spec(module_name) is None:
                continue
        except ModuleNotFoundError:  # its parent package is not installed (e.g. a device without benchmarks/)
            continue
        if only is not None and name != only:
            sub.add_parser(name, help=summary(module_name))
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=summary(module_name), description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        if hasattr(module, "run"):
            p.set_defaults(_run=module.run)  # a nested subcommand's default wins over its parent's


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed subcommand; its return value (None: 0) is the exit status."""
    return int(args._run(args) or 0)
