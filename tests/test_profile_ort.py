"""``benchmarks/profile_ort.py``: ONNX Runtime's own profiler through the ort backend's
``profile_dir`` option, summed per stage and operator type. No timing assertions: the tests check
that every kernel lands in the right stage and run."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from conftest import SMALL  # noqa: E402
from edgevlm.benchmarks.profile_ort import per_run, render, stage_table  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from edgevlm import load_model
    from edgevlm.export.to_onnx import export_onnx

    model = load_model("tiny", **SMALL).float().eval()
    return export_onnx(model, tmp_path_factory.mktemp("profile") / "b", exporter="torchscript", token_check=0,
                       progress=False)


def _trace(path, runs):
    """A trace in ONNX Runtime's format: runs = [(start, dur, [(op, start, dur), ...])] in us."""
    events = []
    for ts, dur, kernels in runs:
        events.append({"cat": "Session", "name": "model_run", "ts": ts, "dur": dur})
        for i, (op, kts, kdur) in enumerate(kernels):
            events += [{"cat": "Node", "name": f"n{i}_fence_before", "ts": kts, "dur": 0, "args": {"op_name": op}},
                       {"cat": "Node", "name": f"n{i}_kernel_time", "ts": kts, "dur": kdur, "args": {"op_name": op}}]
    path.write_text(json.dumps(events))
    return str(path)


def test_kernels_are_summed_per_run_and_stage(tmp_path):
    vision = _trace(tmp_path / "v.json", [(0, 100, [("Conv", 10, 50)]), (1000, 100, [("Conv", 1010, 30)])])
    # two generations of 3 decoder runs each: prefill, decode, decode
    dec = _trace(tmp_path / "d.json", [
        (200, 50, [("MatMul", 210, 20), ("Add", 235, 5)]), (300, 10, [("MatMul", 302, 4)]), (400, 10, [("MatMul", 402, 6)]),
        (1200, 60, [("MatMul", 1210, 40), ("Add", 1255, 2)]), (1300, 10, [("MatMul", 1302, 2)]),
        (1400, 10, [("MatMul", 1402, 8)]),
    ])
    from edgevlm.benchmarks.profile_ort import kernel_events

    runs, kernels = kernel_events(dec)
    assert [dict(r) for r in per_run(runs, kernels)][:2] == [{"MatMul": 0.02, "Add": 0.005}, {"MatMul": 0.004}]
    table = stage_table({"vision_encoder": vision, "decoder": dec}, generations=2, skip=1)  # the 2nd only
    assert table["vision"]["calls"] == 1 and table["vision"]["ops"] == {"Conv": 0.03}
    assert table["prefill"]["calls"] == 1 and table["prefill"]["ops"] == {"MatMul": 0.04, "Add": 0.002}
    assert table["decode"]["calls"] == 2 and table["decode"]["ops"] == {"MatMul": pytest.approx(0.005)}
    assert table["prefill"]["wall_ms"] == pytest.approx(0.06)
    assert "| prefill (x1) |" in render(table, "t")


def test_profile_of_a_real_bundle(bundle):
    from edgevlm.benchmarks.profile_ort import profile

    table = profile(str(bundle), threads=1, prompt_tokens=8, new_tokens=4, runs=1)
    assert [s for s in table] == ["vision", "prefill", "decode"]
    assert table["vision"]["calls"] == 1 and table["prefill"]["calls"] == 1
    assert table["decode"]["calls"] == 3  # tokens 2..4; the first comes from the prefill
    for stage in table.values():
        assert stage["ops"] and all(ms >= 0 for ms in stage["ops"].values())
    assert any("MatMul" in op or "Gemm" in op for op in table["prefill"]["ops"])
    assert "Conv" in table["vision"]["ops"]  # the CLIP patch embedding


def test_profile_dir_is_an_ort_option_only(bundle, tmp_path):
    from edgevlm.runtime import Runtime
    from edgevlm.runtime.errors import EdgeVLMError

    with Runtime.load(bundle, backend="ort", profile_dir=str(tmp_path / "p")) as rt:
        rt.generate(None, "hi", max_new_tokens=2)
        traces = rt.backend.end_profiling()
    assert set(traces) == {"vision_encoder", "embed_tokens", "decoder"}
    assert all(json.loads(open(t).read()) for t in traces.values())
    with pytest.raises(EdgeVLMError, match="profile_dir"):
        Runtime.load(bundle, backend="ort", profile_dirs="x")
