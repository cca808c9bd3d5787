"""The executorch column of the export support matrix (docs/export.md): every integrator marked
"yes" runs as the ``vision_encoder`` method in ExecuTorch (XNNPACK-lowered) and matches PyTorch;
every "no" is refused by the exporter with its reason before anything is written.

All supported integrators go into one program (one method each) so the lowering runs once; the
vision tower is shrunk to one layer (the tower is the same for every integrator and is checked in
the full bundle of tests/test_executorch.py).
"""
from __future__ import annotations

import re

import pytest

pytest.importorskip("torch")
pytest.importorskip("executorch", reason="pip install 'edgevlm[executorch]'")

from conftest import SMALL  # noqa: E402

from edgevlm.model.integrators import INTEGRATORS, export_refusal  # noqa: E402
from edgevlm.runtime.errors import EdgeVLMError  # noqa: E402

SUPPORTED = [n for n in INTEGRATORS.names() if export_refusal(n, "executorch") is None]
REFUSED = [n for n in INTEGRATORS.names() if export_refusal(n, "executorch")]


def _model(name: str):
    from edgevlm import load_model

    return load_model("tiny", integrator=name, **{**SMALL, "vision__num_hidden_layers": 1}).float().eval()


def test_every_supported_integrator_runs_as_the_vision_method():
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    from executorch.runtime import Runtime

    from edgevlm.export.executorch_graphs import example_args, export_method
    from edgevlm.export.executorch_validate import TOLERANCES, errors
    from edgevlm.export.onnx_graphs import VisionEncoder

    programs, cases = {}, {}
    for name in SUPPORTED:
        model = _model(name)
        module = VisionEncoder(model).eval()
        programs[name] = export_method(module, model, "vision_encoder", 0)
        args = example_args(model, "vision_encoder", seed=3)
        with torch.no_grad():
            cases[name] = (args, module(*args))
    edge = to_edge_transform_and_lower(programs, partitioner=[XnnpackPartitioner()],
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False))
    buffer = edge.to_executorch().buffer
    tol = TOLERANCES["fp32"]["vision_encoder"]
    for name, (args, ref) in cases.items():
        program = Runtime.get().load_program(buffer)  # one per method (the Python runtime shares arenas)
        got = program.load_method(name).execute(list(args))[0]
        err = errors(ref, got)
        assert err["atol"] <= tol["atol"] and err["rel_l2"] <= tol["rel_l2"], (name, err)
    assert len(SUPPORTED) >= 8


@pytest.mark.parametrize("name", REFUSED)
def test_refused_integrators_are_refused_with_their_reason(name, tmp_path):
    from edgevlm.export.to_executorch import export_executorch

    reason = export_refusal(name, "executorch")
    with pytest.raises(EdgeVLMError, match=re.escape(f"cannot be exported to executorch: {reason}")):
        export_executorch(_model(name), tmp_path / "b", token_check=0)
    assert not any(tmp_path.iterdir())
