"""The ONNX export checks: correct exports pass with a margin at every thread count, damaged ones fail
by a wide margin, and ``--validate warn`` finishes a failing export with the failures in its manifest.

The bounds (``export/onnx_validate.py: TOLERANCES``) come from ``benchmarks/export_noise.py`` runs at
tiny and MobileVLM-1.7B shape (docs/int8-portability.md, "How the export checks are set"); its JSONL
results are checked here against the bounds in force, so a tightened bound that no longer has its
margin on the measured 1.7B noise fails this file.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from edgevlm.benchmarks.export_noise import (VISION_DAMAGE, damaged_vision, gate, measure_graph, rejudge,  # noqa: E402
                                             thread_pairs)
from edgevlm.export.onnx_graphs import export_graphs  # noqa: E402
from edgevlm.export.onnx_validate import bound_ratio, validate_graph  # noqa: E402
from edgevlm.runtime.errors import EdgeVLMError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NOISE = REPO / "benchmarks" / "results" / "export_noise"
MARGIN = 5  # correct exports stay under 1/MARGIN of their bound, damaged ones over MARGIN times it


@pytest.fixture(scope="module")
def graphs(tiny_model, tmp_path_factory):
    return export_graphs(tiny_model, tmp_path_factory.mktemp("checks_fp32"))


def test_correct_graphs_pass_with_margin_at_every_thread_count(tiny_model, graphs):
    rows = []
    for name, info in graphs.items():
        rows += measure_graph(tiny_model, name, info["path"], "fp32", name)
    assert {(r["torch_threads"], r["ort_threads"]) for r in rows} == set(thread_pairs())
    assert all(r["passed"] for r in rows)
    assert not gate(rows, MARGIN), gate(rows, MARGIN)


@pytest.mark.parametrize("kind", sorted(VISION_DAMAGE))
def test_damaged_vision_export_fails_by_a_wide_margin(tiny_model, tmp_path, kind):
    with damaged_vision(tiny_model.vision_tower, kind), torch.no_grad():
        path = export_graphs(tiny_model, tmp_path, graphs=("vision_encoder",))["vision_encoder"]["path"]
    with pytest.raises(EdgeVLMError, match=r"vision_encoder\.onnx \(fp32\): output image_features.*CPU"):
        validate_graph(tiny_model, "vision_encoder", path, "fp32")
    report = validate_graph(tiny_model, "vision_encoder", path, "fp32", judge=False)
    assert report["failures"] and min(c["bound_ratio"] for c in report["cases"].values()) > MARGIN
    # the damage is the export's, not the model's: the same export of the restored tower passes
    validate_graph(tiny_model, "vision_encoder", export_graphs(tiny_model, tmp_path / "ok", graphs=(
        "vision_encoder",))["vision_encoder"]["path"], "fp32")


def test_perturbed_decoder_fails_by_a_wide_margin(tiny_model, graphs, tmp_path):
    from conftest import perturb_onnx_weight

    from edgevlm.export.onnx_io import copy_graph

    path = tmp_path / "decoder_model_merged.onnx"
    copy_graph(graphs["decoder"]["path"], path)
    perturb_onnx_weight(path, rel=0.05)
    report = validate_graph(tiny_model, "decoder", path, "fp32", judge=False)
    assert min(c["bound_ratio"] for c in report["cases"].values()) > MARGIN
    assert report["failures"] and all("differs from PyTorch" in f for f in report["failures"])


def test_bound_ratio_reads_every_criterion():
    tol = {"rel_l2": 1e-3, "atol": 1e-4, "rtol": 1e-3}
    err = {"max_abs": 2e-3, "rel_l2": 1e-4, "scale": 1.0, "finite": True}
    assert bound_ratio(tol, err) == pytest.approx(2e-3 / 1.1e-3)
    assert bound_ratio(tol, {**err, "rel_l2": 5e-3}) == pytest.approx(5.0)
    assert bound_ratio(tol, {**err, "finite": False}) == float("inf")


@pytest.mark.parametrize("shape", ["tiny", "mobilevlm-1.7b"])
def test_measured_noise_keeps_its_margin_under_the_bounds_in_force(shape):
    """The stored noise runs, re-judged by today's TOLERANCES: every correct graph (fp32 and fp16,
    every thread pair) under 1/MARGIN of its bound, every damaged export over MARGIN times it."""
    rows = [json.loads(line) for line in (NOISE / f"{shape}.jsonl").read_text().splitlines()]
    assert {r["variant"] for r in rows} == {"fp32", "fp16"} and any(r.get("damaged") for r in rows)
    assert len({(r["torch_threads"], r["ort_threads"]) for r in rows}) >= 4 or rows[0]["cores"] == 1
    for r in rows:
        r["bound_ratio"] = rejudge(r)
    assert not gate(rows, MARGIN), gate(rows, MARGIN)


def test_validate_warn_keeps_a_failing_export_and_lists_its_failures(tiny_model, tmp_path, capsys):
    """A vision graph exported from a tower that selects the wrong layer: strict (the default)
    refuses it and leaves no bundle; warn writes it with every failed check in the manifest."""
    from edgevlm.export.onnx_checks import warn_failed_checks
    from edgevlm.export.to_onnx import export_onnx
    from edgevlm.runtime import Runtime
    from edgevlm.runtime.manifest import read_manifest

    with damaged_vision(tiny_model.vision_tower, "select_layer"), torch.no_grad():
        damaged = export_graphs(tiny_model, tmp_path / "graphs")
    strict = tmp_path / "strict"
    with pytest.raises(EdgeVLMError, match=r"vision_encoder\.onnx \(fp32\)"):
        export_onnx(tiny_model, strict, fp32_graphs=damaged, progress=False, token_check=0)
    assert not strict.exists() and not [p for p in tmp_path.iterdir() if ".partial-" in p.name]

    out = export_onnx(tiny_model, tmp_path / "warn", fp32_graphs=damaged, progress=False, token_check=2,
                      validate="warn")
    info = read_manifest(out).target_info
    assert info.validate == "warn"
    assert any(f.startswith("vision_encoder.onnx (fp32): output image_features") for f in info.failed_checks)
    assert any(f.startswith("token check: held-out prompt") for f in info.failed_checks)
    assert info.graphs["decoder"].validation["failures"] == []  # the decoder itself is fine
    warn_failed_checks(out)
    assert f"{len(info.failed_checks)} export check(s) failed" in capsys.readouterr().err
    with Runtime.load(out) as rt:  # the kept bundle is an ordinary bundle
        assert rt.generate(None, "hello", max_new_tokens=2).token_ids

    with pytest.raises(EdgeVLMError, match="--validate must be one of strict, warn"):
        export_onnx(tiny_model, tmp_path / "x", fp32_graphs=damaged, progress=False, validate="lenient")
