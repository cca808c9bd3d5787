"""Every registered integrator: shapes, token counts, parameter counts, registry errors."""
import pytest
import torch

from edgevlm.runtime.errors import EdgeVLMError
from edgevlm.train.config import IntegratorConfig
from edgevlm.train.integrators import INTEGRATORS, build_integrator, count_parameters

# Reference parameter counts at MobileVLM-1.7B widths (d_v 1024, d_t 2048, 24x24 grid).
REFERENCE_PARAMS = {"linear": 2_099_200, "mlp2x_gelu": 6_295_552, "ldp": 18_936_832, "ldpv2": 6_316_032}


@pytest.mark.parametrize("name", INTEGRATORS.names())
def test_forward_shape_matches_num_tokens(name):
    m = build_integrator(IntegratorConfig(name), 32, 48, 24)
    x = torch.randn(2, 576, 32)
    y = m(x)
    assert y.shape == (2, m.num_tokens(576), 48)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_parameter_counts_match_reference(name):
    with torch.device("meta"):
        m = build_integrator(IntegratorConfig(name), 1024, 2048, 24)
    assert count_parameters(m) == REFERENCE_PARAMS[name]


def test_ldp_state_dict_keys_match_mobilevlm():
    keys = set(build_integrator(IntegratorConfig("ldp"), 16, 32, 24).state_dict())
    for k in ["model.mlp.1.weight", "model.mlp.3.bias", "model.mb_block.1.block.0.0.weight",
              "model.mb_block.2.block.0.1.bias", "model.mb_block.1.block.1.fc1.weight",
              "model.mb_block.2.block.1.fc2.bias", "model.mb_block.1.block.2.0.weight",
              "model.mb_block.2.block.2.1.weight"]:
        assert k in keys
    v2 = set(build_integrator(IntegratorConfig("ldpv2"), 16, 32, 24).state_dict())
    assert v2 == {"mlp.mlp.0.weight", "mlp.mlp.0.bias", "mlp.mlp.2.weight", "mlp.mlp.2.bias",
                  "peg.peg.0.weight", "peg.peg.0.bias"}


def test_ldpv2_pool_equals_adaptive_pool():
    m = build_integrator(IntegratorConfig("ldpv2"), 8, 16, 24).eval()
    x = torch.randn(1, 576, 8)
    h = m.mlp(x).transpose(1, 2).reshape(1, 16, 24, 24)
    ref = torch.nn.AdaptiveAvgPool2d((12, 12))(h)
    ref = (m.peg.peg(ref) + ref).flatten(2).transpose(1, 2)
    torch.testing.assert_close(m(x), ref)


def test_ldp_rejects_wrong_grid():
    m = build_integrator(IntegratorConfig("ldp"), 8, 16, 24)
    with pytest.raises(EdgeVLMError, match="24x24"):
        m(torch.randn(1, 577, 8))


def test_unknown_integrator_lists_valid_names():
    with pytest.raises(EdgeVLMError) as e:
        build_integrator(IntegratorConfig("nope"), 8, 16, 24)
    for name in INTEGRATORS.names():
        assert name in str(e.value)


def test_registry_rejects_duplicates():
    with pytest.raises(ValueError):
        INTEGRATORS.add("ldp", object)


class _RefusingProjector(torch.nn.Linear):
    """Test-only integrator that refuses two targets."""

    gguf_projector = None
    export_refusals = {"onnx": "test reason one", "coreml": "test reason two"}

    def __init__(self, vision_dim, llm_dim, grid):
        super().__init__(vision_dim, llm_dim)

    def num_tokens(self, n_features):
        return n_features


def test_export_refusals_reach_matrix_and_exporters(monkeypatch, tmp_path):
    from edgevlm import load_model
    from edgevlm.export import support_matrix
    from edgevlm.train.integrators import export_refusal
    from conftest import SMALL

    monkeypatch.setitem(INTEGRATORS._items, "refusing_test", _RefusingProjector)  # this test only
    cells = support_matrix.support("refusing_test")
    assert cells == {"onnx": "no: test reason one", "tensorrt": "yes",
                     "gguf": "no: llama.cpp has no projector type for it", "coreml": "no: test reason two"}
    assert export_refusal("refusing_test", "tensorrt") is None
    with pytest.raises(ValueError, match="unknown export target"):
        export_refusal("refusing_test", "tflite")
    model = load_model("tiny", integrator="refusing_test", **SMALL)
    from edgevlm.export.to_onnx import export_onnx
    from edgevlm.export.to_coreml import export_coreml
    from edgevlm.export.to_gguf import export_gguf

    with pytest.raises(EdgeVLMError, match="cannot be exported to onnx: test reason one"):
        export_onnx(model, tmp_path / "onnx")
    with pytest.raises(EdgeVLMError, match="cannot be exported to gguf: llama.cpp has no projector"):
        export_gguf(model, tmp_path / "gguf")
    with pytest.raises(EdgeVLMError, match="cannot be exported to coreml: test reason two"):
        export_coreml(model, tmp_path / "coreml")
    assert not any(tmp_path.iterdir())  # refused before writing anything
