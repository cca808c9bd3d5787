"""``edgevlm <subcommand>``: one subcommand per role; each lives in the module that does the work.

Each command module defines ``add_arguments(parser)`` and ``run(args) -> int | None`` and a
docstring (its help). Modules are imported lazily, so ``edgevlm run`` never imports torch.
User mistakes (EdgeVLMError) print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from edgevlm.runtime.errors import EdgeVLMError

COMMANDS: dict[str, str] = {
    "list": "edgevlm.train.listing",
    "data": "edgevlm.train.make_data",
    "train": "edgevlm.train.train",
    "eval": "edgevlm.train.evaluate",
    "ask": "edgevlm.train.ask",
    "probe": "edgevlm.train.probe",
    "export": "edgevlm.export.cli",
    "run": "edgevlm.runtime.cli_run",
    "serve": "edgevlm.runtime.serve.cli",
    "bench": "edgevlm.benchmarks.cli",
}
# --backend NAME -> the module of a layer above the runtime that registers it (the runtime never names them)
LAYER_BACKENDS: dict[str, str] = {"torch": "edgevlm.model.torch_backend"}


def _summary(module_name: str) -> str:
    # read the first docstring line without importing the module (keeps --help fast)
    spec = importlib.util.find_spec(module_name)
    with open(spec.origin) as f:
        text = f.read()
    doc = text.split('"""')[1] if '"""' in text else ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgevlm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        if importlib.util.find_spec(module_name) is None:
            continue  # a role whose module is not present in this checkout
        if only is not None and name != only:
            sub.add_parser(name, help=_summary(module_name))
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=_summary(module_name), description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    only = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(only)
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        parser.print_help()
        return 2
    try:
        if (module := LAYER_BACKENDS.get(getattr(args, "backend", None))) is not None:
            importlib.import_module(module)  # registers the backend with the runtime
        return int(args._run(args) or 0)
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
