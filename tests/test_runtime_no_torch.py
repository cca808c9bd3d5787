"""``edgevlm.runtime`` imports and runs an ONNX bundle with torch and transformers unavailable: a
subprocess whose prelude makes importing either (or any submodule) raise ImportError."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from edgevlm.export.to_onnx import export_onnx  # noqa: E402

BLOCK = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = ("torch", "transformers")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
    for m in [m for m in sys.modules if m.split(".")[0] in BLOCKED]:
        del sys.modules[m]
""")

PROGRAM = BLOCK + textwrap.dedent("""
    import json
    from edgevlm.runtime import Runtime
    bundle, image = sys.argv[1], sys.argv[2]
    with Runtime.load(bundle, backend="ort", threads=1) as rt:
        r = rt.generate(image, "What colour is the circle?", max_new_tokens=6, ignore_eos=True)
        pieces = list(rt.stream(image, "What colour is the circle?", max_new_tokens=6, ignore_eos=True))
    try:
        import torch  # noqa: F401
        blocked = False
    except ImportError:
        blocked = True
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({"ids": r.token_ids, "text": r.text, "stream": "".join(pieces),
                      "timings": r.timings.to_dict(), "blocked": blocked, "loaded": loaded}))
""")


@pytest.fixture(scope="module")
def bundle(tiny_model, tmp_path_factory):
    return export_onnx(tiny_model, tmp_path_factory.mktemp("no_torch") / "tiny", exporter="torchscript",
                       progress=False)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("no_torch_img") / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (180, 240, 3), dtype=np.uint8)).save(path)
    return path


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def test_runtime_generates_without_torch_or_transformers(bundle, image, tiny_model):
    p = _run(PROGRAM, str(bundle), str(image))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["blocked"] and out["loaded"] == []
    assert out["timings"]["n_generated"] == 6 and out["timings"]["n_visual_tokens"] == tiny_model.n_visual_tokens
    assert out["stream"] == out["text"]
    ref = tiny_model.generate(str(image), "What colour is the circle?", max_new_tokens=6, ignore_eos=True)
    assert out["ids"] == ref.token_ids  # the same answer as the torch model


def test_cli_run_without_torch(bundle, image):
    code = BLOCK + "from edgevlm.cli import main\nsys.exit(main(sys.argv[1:]))"
    p = _run(code, "run", "--bundle", str(bundle), "--image", str(image), "--prompt", "What colour?",
             "--max-new-tokens", "4", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["timings"]["n_generated"] >= 1
    p = _run(code, "run", "--bundle", str(bundle), "--image", str(bundle / "manifest.json"), "--prompt", "x")
    assert p.returncode == 2 and "not an image" in p.stderr  # one line, no traceback
    assert "Traceback" not in p.stderr


@pytest.fixture(scope="module")
def gguf_bundle(tiny_model, tmp_path_factory):
    from conftest import tiny_gguf

    return tiny_gguf(tiny_model, tmp_path_factory.mktemp("no_torch_gguf") / "tiny", ["q4_0"])


def test_cli_run_takes_the_backend_from_the_bundle_without_torch(gguf_bundle, bundle, image):
    """``edgevlm run --bundle`` with no --backend: the GGUF bundle runs on llama.cpp, the ONNX one on
    ONNX Runtime, torch never imported."""
    code = BLOCK + ("from edgevlm.cli import main\nrc = main(sys.argv[1:])\n"
                    "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED)))\nsys.exit(rc)")
    code = "import json\n" + code
    for b in (gguf_bundle, bundle):
        p = _run(code, "run", "--bundle", str(b), "--image", str(image), "--prompt", "What colour?",
                 "--max-new-tokens", "3", "--threads", "1", "--json")
        assert p.returncode == 0, p.stderr
        lines = p.stdout.strip().splitlines()
        assert json.loads(lines[-2])["timings"]["n_generated"] >= 1 and lines[-1] == "[]"


def test_a_model_dir_without_torch_is_one_line_naming_the_extra(tmp_path):
    code = BLOCK + "from edgevlm.cli import main\nsys.exit(main(sys.argv[1:]))"
    p = _run(code, "run", "--bundle", "tiny", "--prompt", "hi")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "tiny: not a bundle" in p.stderr and "pip install 'edgevlm[train]'" in p.stderr
