"""ExecuTorch bundles (issue 33): export/to_executorch.py, the ``executorch`` backend, and ExecuTorch's
own ``MultimodalRunner`` (the C++ runner's Python bindings in the wheel) on the same ``.pte``.

One 8da4w bundle of the trained tiny model is exported through the CLI, exactly as a user runs it; the
tests read it. Everything here is the real ExecuTorch runtime (XNNPACK kernels).
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("executorch", reason="pip install 'edgevlm[executorch]'")

from conftest import REPO  # noqa: E402

from edgevlm.runtime.errors import EdgeVLMError  # noqa: E402

MAX_SEQ_LEN = 256
PROMPTS = 4  # held-out ShapesVQA questions the runner answers
STEPS = 8


@pytest.fixture(scope="session")
def trained(trained_tiny):
    from edgevlm import load_model

    return load_model(trained_tiny).float().eval()


@pytest.fixture(scope="session")
def et_bundle(trained_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("et") / "tiny-et"
    cmd = [sys.executable, REPO / "export" / "to_executorch.py", "--model", trained_tiny, "--out", out,
           "--quantize", "8da4w", "--max-seq-len", str(MAX_SEQ_LEN), "--token-check", "2"]
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "wrote" in p.stdout
    return out


def _manifest(bundle):
    from edgevlm.runtime.manifest import read_manifest

    return read_manifest(bundle)


def test_bundle_follows_the_runner_contract(et_bundle):
    from executorch.runtime import Runtime

    info = _manifest(et_bundle).target_info
    program = Runtime.get().load_program(et_bundle / info.pte)
    names = program.method_names
    assert {"vision_encoder", "token_embedding", "text_decoder", "get_max_seq_len", "get_eos_ids"} <= names
    assert program.load_method("get_max_seq_len").execute([])[0] == MAX_SEQ_LEN
    assert info.quantize == "8da4w" and info.quantization["quantized_linears"] > 0
    assert info.lowering["xnnpack_delegates"]["text_decoder"] > 0  # the quantised linears went to XNNPACK
    assert not info.failed_checks and all(not m["failures"] for m in info.validation.values())
    tc = info.token_check
    assert tc.n_sequences == 2 and tc.logit_atol is None  # quantised: reported
    assert tc.kl_mean < 0.1 and tc.same_top_token >= 0.5  # a broken bundle is far outside (KL >> 1)


def test_edgevlm_run_answers_from_the_bundle(et_bundle):
    from edgevlm.export.token_check import held_out_prompts
    from edgevlm.runtime.engine import Runtime

    image, question = held_out_prompts(1)[0]
    path = et_bundle.parent / "q.png"
    image.save(path)
    p = subprocess.run([sys.executable, "-m", "edgevlm.cli", "run", "--bundle", str(et_bundle), "--image", str(path),
                        "--prompt", question, "--max-new-tokens", str(STEPS), "--threads", "1", "--json"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    with Runtime.load(et_bundle, threads=1) as rt:  # the same bundle in this process: the same answer
        assert out["token_ids"] == _greedy(rt, image, question)
    assert out["text"].strip()


def test_prefix_reuse_matches_a_full_prefill(et_bundle):
    from edgevlm.runtime.backends import get_backend

    rng = np.random.default_rng(0)
    ids = rng.integers(3, 500, size=40)
    with get_backend("executorch")(et_bundle, _manifest(et_bundle), threads=1) as be:
        full = be.prefill([ids])
        be.prefill([ids[:25], rng.integers(3, 500, size=9)])  # a longer, different tail to drop
        kept = be.prefill_from(25, [ids[25:]])
        assert be.n_past == 40
        np.testing.assert_allclose(kept, full, atol=1e-4)
        with pytest.raises(EdgeVLMError, match="exceed"):
            be.prefill([rng.integers(3, 500, size=MAX_SEQ_LEN + 1)])


def test_checks_fail_on_a_model_the_pte_was_not_exported_from(et_bundle, trained):
    """The per-method check fails, and the token check's KL grows, when PyTorch computes something
    else than the .pte (noise on one integrator weight and on the LM head)."""
    import copy

    import torch

    from edgevlm.export.executorch_lower import build_modules
    from edgevlm.export.executorch_validate import validate_pte
    from edgevlm.export.token_check import check_tokens

    damaged = copy.deepcopy(trained)
    with torch.no_grad():
        for w, rel in ((next(damaged.integrator.parameters()), 0.05), (damaged.llm.lm_head.weight, 0.5)):
            w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * w.std() * rel)
    modules, _ = build_modules(damaged, MAX_SEQ_LEN, "8da4w")
    report = validate_pte(et_bundle / "model.pte", damaged, modules, "8da4w", MAX_SEQ_LEN, judge=False)
    assert report["vision_encoder"]["failures"] and not report["token_embedding"]["failures"]
    with pytest.raises(EdgeVLMError, match="vision_encoder"):
        validate_pte(et_bundle / "model.pte", damaged, modules, "8da4w", MAX_SEQ_LEN, judge=True)
    record = check_tokens(damaged, et_bundle, _manifest(et_bundle), 2, backend="executorch", threads=1)
    assert record.kl_mean > 2 * _manifest(et_bundle).target_info.token_check.kl_mean


def test_export_refuses_bad_arguments_before_loading(tmp_path):
    from edgevlm.cli import main

    assert main(["export", "executorch", "--model", "tiny", "--out", str(tmp_path / "b"), "--group-size", "24"]) == 2
    assert main(["export", "executorch", "--model", "tiny", "--out", str(tmp_path / "b"), "--max-seq-len", "8",
                 "llm.num_hidden_layers=1", "vision.num_hidden_layers=1"]) == 2
    assert not (tmp_path / "b").exists()


def _greedy(runtime, image, question) -> list[int]:
    return runtime.generate(image=image, prompt=question, max_new_tokens=STEPS).token_ids


def _runner_pieces(runner, runtime, image, question) -> list[str]:
    """ExecuTorch's MultimodalRunner on the prompt the runtime builds: text runs as token inputs
    (the runtime's tokenizer and chat template), the image as the bundle's preprocessed pixels."""
    import torch
    from executorch.extension.llm.runner import GenerationConfig, make_image_input, make_token_input

    from edgevlm.runtime.processor import split_at_images

    ids, pixels = runtime.processor(image, question)
    inputs = [make_image_input(torch.from_numpy(pixels[part])) if isinstance(part, int) else make_token_input(part)
              for part in split_at_images(ids)]
    pieces: list[str] = []
    runner.reset()
    runner.generate(inputs, GenerationConfig(echo=False, max_new_tokens=STEPS, temperature=0.0),
                    token_callback=pieces.append)
    return pieces


def _pieces(sp, ids: list[int]) -> list[str]:
    """What the runner's callback gets for ``ids``: its own tokenizer's piece of each token (the C++
    runner calls decode(previous, current), which differs from decode(current) only after BOS)."""
    return [sp.decode(t) for t in ids]


def test_multimodal_runner_gives_the_backends_greedy_tokens(et_bundle):
    from executorch.extension.llm.runner import MultimodalRunner
    from pytorch_tokenizers import CppSPTokenizer

    from edgevlm.export.token_check import held_out_prompts
    from edgevlm.runtime.engine import Runtime

    info = _manifest(et_bundle).target_info
    runner = MultimodalRunner(str(et_bundle / info.pte), str(et_bundle / info.tokenizer))
    sp = CppSPTokenizer()
    sp.load(str(et_bundle / info.tokenizer))
    prompts = held_out_prompts(PROMPTS)
    answers = []
    with Runtime.load(et_bundle, threads=1) as rt:
        assert rt.backend.name == "executorch"
        for image, question in prompts:
            ids = _greedy(rt, image, question)
            got = _runner_pieces(runner, rt, image, question)
            assert got[:len(ids)] == _pieces(sp, ids), question  # the runner continues past EOS only if we stop
            answers.append(got)
        # the check can fail: asked the next prompt's question (question types rotate), the runner
        # answers differently somewhere
        swapped = [_runner_pieces(runner, rt, image, prompts[(i + 1) % PROMPTS][1]) for i, (image, _) in enumerate(prompts)]
    assert swapped != answers
