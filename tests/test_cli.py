"""The console command: --help everywhere, one-line errors with exit status 2."""
import subprocess
import sys

import pytest

from edgevlm.cli import COMMANDS
from conftest import REPO

EDGEVLM = [sys.executable, "-m", "edgevlm.cli"]


def run(*args, **kw):
    return subprocess.run([*EDGEVLM, *args], capture_output=True, text=True, cwd=str(REPO), timeout=300, **kw)


def test_top_level_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0
    for name in ("list", "train", "eval", "ask", "export"):
        assert name in out.stdout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command):
    out = run(command, "--help")
    assert out.returncode == 0, out.stderr
    assert "usage: edgevlm " + command in out.stdout


@pytest.mark.parametrize("script", ["train/train.py", "train/make_data.py", "train/ask.py", "train/evaluate.py"])
def test_scripts_run_by_path(script):
    out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=str(REPO))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: edgevlm")


def test_export_targets_come_from_a_registry_in_help_order():
    from edgevlm.export.cli import EXPORTERS
    from edgevlm.runtime.errors import EdgeVLMError

    targets = ["onnx", "gguf", "trt", "coreml", "executorch"]
    assert [name for name, _ in EXPORTERS.items()] == targets
    assert EXPORTERS.get("gguf") == "edgevlm.export.to_gguf"
    with pytest.raises(EdgeVLMError, match="valid: coreml, executorch, gguf, onnx, trt"):
        EXPORTERS.get("tflite")
    out = run("export", "--help")
    listed = [line.split()[0] for line in out.stdout.splitlines() if line.startswith("    ") and line.split()[0] in EXPORTERS]
    assert out.returncode == 0 and listed == targets


def test_list_integrators_prints_tokens_and_params():
    out = run("list", "integrators")
    assert out.returncode == 0
    line = next(l for l in out.stdout.splitlines() if l.startswith("ldp "))
    assert "144" in line and "18.94M" in line


def _one_line_error(out, *needles):
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    for n in needles:
        assert n in lines[0]


def test_unknown_preset_is_one_line(tmp_path):
    _one_line_error(run("ask", "--model", "tiny-xl", "--prompt", "hi"), "tiny-xl", "mobilevlm-1.7b")


def test_unknown_integrator_is_one_line():
    _one_line_error(run("list", "integrators", "--preset", "nope"), "unknown preset")


def test_not_an_image_is_one_line(tmp_path):
    bad = tmp_path / "cat.jpg"
    bad.write_bytes(b"\x00" * 100)
    _one_line_error(run("ask", "--model", "tiny", "--image", str(bad), "--prompt", "hi",
                        env={**__import__("os").environ}), "cat.jpg")


def test_malformed_dataset_is_one_line(tmp_path):
    (tmp_path / "train.json").write_text("[{]")
    (tmp_path / "r.yaml").write_text(f"stages:\n  - name: s\n    data: {tmp_path / 'train.json'}\n")
    _one_line_error(run("train", "--recipe", str(tmp_path / "r.yaml")), "train.json")


@pytest.mark.parametrize("argv, module", [
    (["run", "--bundle", "b", "--prompt", "p"], "edgevlm.runtime.cli_run"),
    (["export", "onnx", "--model", "tiny", "--out", "o"], "edgevlm.export.to_onnx"),
    (["bench", "profile", "b"], "edgevlm.benchmarks.profile_ort"),
])
def test_one_dispatcher_runs_the_innermost_subcommand(argv, module):
    """``edgevlm``, ``edgevlm export`` and ``edgevlm bench`` share ``runtime.subcommands``: the parsed
    arguments carry the ``run`` of the module that defines the innermost subcommand."""
    import importlib

    from edgevlm.cli import build_parser

    args = build_parser(argv[0]).parse_args(argv)
    assert args._run is importlib.import_module(module).run


def test_only_the_chosen_commands_module_is_imported():
    """The other commands are listed from their docstrings: none of their modules, nor torch, is imported."""
    code = ("import sys\nfrom edgevlm.cli import build_parser\nbuild_parser('run')\n"
            "print('torch' in sys.modules, sorted(m for m in sys.modules if m.startswith("
            "('edgevlm.model', 'edgevlm.train.', 'edgevlm.export.', 'edgevlm.benchmarks.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False []"
