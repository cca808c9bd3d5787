"""GGUF export refuses what llama.cpp cannot run, with the reason: integrators without a llama.cpp
graph, resampler configurations its graph hard-codes otherwise, and a resampler with a class
embedding; and the resampler's position table follows llama.cpp's 70x70 buckets."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("gguf", reason="GGUF export needs the gguf package (pip install 'edgevlm[export]')")

from conftest import SMALL  # noqa: E402

from edgevlm.runtime.errors import EdgeVLMError  # noqa: E402


def _export(model, out, quants):
    from edgevlm.export.to_gguf import export_gguf

    return export_gguf(model, out, quants, progress=False)


def _gguf_refused():
    from edgevlm.model.integrators import INTEGRATORS, export_refusal

    return [n for n in INTEGRATORS.names() if export_refusal(n, "gguf")]


@pytest.mark.parametrize("name", _gguf_refused())
def test_integrators_without_a_llama_cpp_graph_are_refused_with_their_reason(name, tmp_path):
    import re

    from edgevlm import load_model
    from edgevlm.model.integrators import export_refusal

    model = load_model("tiny", integrator=name, **SMALL)
    with pytest.raises(EdgeVLMError, match=re.escape(f"cannot be exported to gguf: {export_refusal(name, 'gguf')}")):
        _export(model, tmp_path / "b", ["f16"])
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("kwargs, overrides, needle", [
    ({"num_heads": 1}, {}, "hard-codes 128-wide attention heads"),
    ({}, {"llm__hidden_size": 192, "llm__num_attention_heads": 3}, "width 192"),
    ({"eps": 1e-6}, {}, "vision tower's epsilon"),
])
def test_resampler_configs_llama_cpp_cannot_run_are_refused(kwargs, overrides, needle, tmp_path):
    from edgevlm import load_model

    model = load_model("tiny", integrator="minicpmv_resampler", integrator_kwargs=kwargs, **SMALL, **overrides)
    with pytest.raises(EdgeVLMError, match=needle):
        _export(model, tmp_path / "b", ["f16"])


def test_resampler_positions_follow_llama_cpps_70x70_buckets():
    """llama.cpp's resampler graph reads ViT position row floor(70 i/g)*70 + floor(70 j/g) for patch
    (i, j): the writer puts CLIP's row i*g + j there, and nothing else anywhere."""
    import torch

    from edgevlm.export.gguf_mmproj import bucketed_positions

    g, d = 24, 8
    pos = torch.randn(g * g, d)
    table = bucketed_positions(pos, g)  # [4900, D] f16
    ids = [(70 * i // g) * 70 + 70 * j // g for i in range(g) for j in range(g)]
    assert table.shape == (4900, d) and len(set(ids)) == g * g
    np.testing.assert_array_equal(table[ids], pos.numpy().astype(np.float16))
    assert not np.delete(table, ids, axis=0).any()


def test_resampler_mmproj_refuses_a_class_embedding(tmp_path):
    from edgevlm import load_model
    from edgevlm.export.gguf_mmproj import write_mmproj

    model = load_model("tiny", integrator="minicpmv_resampler", **SMALL)
    with pytest.raises(EdgeVLMError, match="cls='omit'"):
        write_mmproj(model, tmp_path / "mmproj.gguf", cls="keep")
