"""The layers import downwards only: runtime <- model <- train, export <- benchmarks.

Every import statement of every module is read (module level and inside functions: the lazy ones
that would make a loop at run time are the ones that matter), relative imports resolved. The
runtime imports nothing from above it; the model layer (``model/``) imports neither training, export
nor benchmarks, save the one import listed in ``MODEL_LAYER_PENDING`` with its reason.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

PACKAGES = {"runtime": "edgevlm.runtime", "model": "edgevlm.model", "train": "edgevlm.train", "export": "edgevlm.export",
            "benchmarks": "edgevlm.benchmarks", "edgevlm": "edgevlm"}
MODEL_LAYER = ("model",)
ABOVE_RUNTIME = ("edgevlm.model", "edgevlm.train", "edgevlm.export", "edgevlm.benchmarks", "edgevlm.cli", "torch")
# (module file, imported module) -> why it is still there
MODEL_LAYER_PENDING = {
    ("model/load.py", "edgevlm.train.data.tokenizer"):
        "a preset's tokenizer is trained on the ShapesVQA corpus (train/data/shapes.py) on first use",
}
# the runtime's one torch import, and why: ExecuTorch's Python bindings take and return torch tensors
# (they import torch themselves); the backend comes with the workstation extra [executorch], never
# with a lean device extra (tests/test_install.py), and a phone runs ExecuTorch's C++ runner instead
RUNTIME_TORCH = {("runtime/backends/executorch.py", "torch"):
                 "executorch.runtime's methods take torch tensors (docs/executorch.md)"}


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGES[parts[0]], *parts[1:]])


def imports(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path`` (or ``source`` as if it were that
    file), lazy ones included."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    script = {id(n) for top in tree.body if _is_main_guard(top) for n in ast.walk(top)}
    out = []
    for node in ast.walk(tree):
        if id(node) in script:  # `python runtime/cli_run.py` enters through the top-level CLI
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # "from edgevlm import load_model" imports the public API, i.e. the layers above
            out += [(node.lineno, f"{mod}.{a.name}" if mod == "edgevlm" else mod) for a in node.names]
    return out


def _is_main_guard(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "__name__" in ast.unparse(node.test) and "__main__" in ast.unparse(node.test)


def files(*roots: str) -> list[Path]:
    out = []
    for r in roots:
        p = REPO / r
        out += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return out


def offending(paths: list[Path], forbidden: tuple[str, ...], source: str | None = None,
              allowed: dict = MODEL_LAYER_PENDING) -> list[str]:
    bad = []
    for path in paths:
        rel = str(path.relative_to(REPO))
        for line, mod in imports(path, source):
            above = mod == "edgevlm.load_model" or any(mod == f or mod.startswith(f + ".") for f in forbidden)
            if above and (rel, mod) not in allowed:
                bad.append(f"{rel}:{line} imports {mod}")
    return bad


def test_the_runtime_imports_nothing_above_it():
    paths = files("runtime")
    assert len(paths) > 20
    assert not offending(paths, ABOVE_RUNTIME, allowed=RUNTIME_TORCH)


def test_the_model_layer_imports_neither_training_nor_export_nor_benchmarks():
    paths = files(*MODEL_LAYER)
    assert len(paths) > 15
    assert not offending(paths, ("edgevlm.train", "edgevlm.export", "edgevlm.benchmarks", "edgevlm.cli"))


def test_the_pending_exception_is_still_real():
    """Drop an entry from MODEL_LAYER_PENDING once its import is gone."""
    for (rel, mod), _ in MODEL_LAYER_PENDING.items():
        assert mod in [m for _, m in imports(REPO / rel)], (rel, mod)


@pytest.mark.parametrize("source, message", [
    ("from edgevlm.export.common import base_manifest\n", "edgevlm.export.common"),
    ("def f():\n    from ...model import load\n", "edgevlm.model"),
    ("def f():\n    from edgevlm import load_model\n", "edgevlm.load_model"),
    ("import torch\n", "torch"),
    ("if __name__ == '__main__':\n    import torch\nimport edgevlm.train.loop\n", "edgevlm.train.loop"),
])
def test_the_check_sees_module_level_lazy_relative_and_public_api_imports(source, message):
    probe = REPO / "runtime" / "backends" / "_probe.py"  # read as if it were this file (never written)
    bad = offending([probe], ABOVE_RUNTIME, source=source)
    assert len(bad) == 1 and message in bad[0], bad


def _above_runtime_strings(path: Path) -> list[str]:
    """String constants in ``path`` that name a module above the runtime (``"edgevlm.model..."``)."""
    tree = ast.parse(path.read_text(), str(path))
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and any(n.value == f or n.value.startswith(f + ".") for f in ABOVE_RUNTIME
                    if f.startswith("edgevlm."))]


def test_the_runtime_names_nothing_above_it_and_the_package_provides_the_torch_backend():
    """``Runtime.load(path, backend="torch")`` imports the model layer's backend on first use. No
    runtime module names a module above the runtime, not even as a string; the ``edgevlm`` package
    (imported before any of its subpackages) provides the torch backend to the runtime's registries."""
    from edgevlm.runtime.backends import BACKEND_MODULES, BACKENDS, MODEL_DIR_BACKENDS

    named = {str(p.relative_to(REPO)): found for p in files("runtime") if (found := _above_runtime_strings(p))}
    assert named == {}
    assert all(v.startswith("edgevlm.runtime.") for v in BACKEND_MODULES.values())
    assert BACKENDS.modules["torch"] == MODEL_DIR_BACKENDS.modules["torch"] == "edgevlm.model.torch_backend"
    assert _above_runtime_strings(REPO / "edgevlm" / "__init__.py") == ["edgevlm.model.torch_backend"]
    with pytest.raises(ValueError, match="already provided by edgevlm.model.torch_backend"):
        BACKENDS.provide("torch", "somewhere.else")


def test_the_torch_backend_loads_from_python_without_the_cli(tmp_path):
    """In a fresh process that never imports ``edgevlm.cli``: a preset and a model dir open with
    ``backend="torch"``, and a model dir with no backend named (a path without manifest.json is the
    torch backend's)."""
    import subprocess
    import sys

    pytest.importorskip("torch")
    code = ("import sys\n"
            "from edgevlm.runtime import Runtime\n"
            "from edgevlm.model.checkpoint import save_model\n"
            "rt = Runtime.load('tiny', backend='torch', threads=1)\n"
            "save_model(rt.backend.model, sys.argv[1])\n"
            "names = [rt.backend.name, Runtime.load(sys.argv[1], backend='torch', threads=1).backend.name,\n"
            "         Runtime.load(sys.argv[1], threads=1).backend.name]\n"
            "print(names, 'edgevlm.cli' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "model")], capture_output=True, text=True,
                         timeout=600, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['torch', 'torch', 'torch'] False"
