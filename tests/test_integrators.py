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
