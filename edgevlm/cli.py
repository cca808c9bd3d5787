"""``edgevlm <subcommand>``: one subcommand per role; each lives in the module that does the work.

Each command module defines ``add_arguments(parser)`` and ``run(args) -> int | None`` and a
docstring (its help); ``runtime.subcommands`` builds the parser (the same for ``edgevlm export`` and
``edgevlm bench``). Modules are imported lazily, so ``edgevlm run`` never imports torch.
User mistakes (EdgeVLMError) print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import logging
import sys

from edgevlm.runtime.errors import EdgeVLMError
from edgevlm.runtime.subcommands import add_subcommands, run_command

# Libraries that log at import time: torchao (pulled in by transformers' quantizer table when
# installed with ExecuTorch) warns about CUDA kernels it cannot load and torch about deprecated
# pytree registrations. Neither concerns a command, and a user's mistake should stay one line.
QUIET_IMPORT_LOGGERS = ("torchao", "torch.utils._pytree")

COMMANDS: dict[str, str] = {
    "list": "edgevlm.train.listing",
    "data": "edgevlm.train.make_data",
    "train": "edgevlm.train.train",
    "eval": "edgevlm.train.evaluate",
    "ask": "edgevlm.train.ask",
    "probe": "edgevlm.train.probe",
    "export": "edgevlm.export.cli",
    "run": "edgevlm.runtime.cli_run",
    "watch": "edgevlm.runtime.cli_watch",
    "serve": "edgevlm.runtime.serve.cli",
    "bench": "edgevlm.benchmarks.cli",
    "bench-target": "edgevlm.runtime.bench_target",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgevlm", description=__doc__.splitlines()[0])
    add_subcommands(parser, COMMANDS, "command", only=only)
    return parser


def main(argv: list[str] | None = None) -> int:
    for name in QUIET_IMPORT_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    argv = list(sys.argv[1:] if argv is None else argv)
    only = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(only)
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        parser.print_help()
        return 2
    try:
        return run_command(args)
    except EdgeVLMError as e:
        print(f"edgevlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def script_main(*command: str) -> None:
    """Entry for scripts run by path (``python train/train.py ...``, ``python export/to_onnx.py ...``)."""
    sys.exit(main([*command, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
