"""Every registered integrator: shapes, token counts, parameter counts, registry errors."""
import pytest
import torch

from edgevlm.runtime.errors import EdgeVLMError
from edgevlm.model.config import IntegratorConfig
from edgevlm.model.integrators import INTEGRATORS, build_integrator, count_parameters

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
    from edgevlm.model.integrators import export_refusal
    from conftest import SMALL

    monkeypatch.setitem(INTEGRATORS._items, "refusing_test", _RefusingProjector)  # this test only
    cells = support_matrix.support("refusing_test")
    assert cells == {"onnx": "no: test reason one", "trt": "yes",
                     "gguf": "no: llama.cpp has no projector type for it", "coreml": "no: test reason two",
                     "executorch": "yes"}
    assert export_refusal("refusing_test", "trt") is None
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


# --- out-of-block integrators (c_abstractor, resamplers, qformer, pixel_shuffle_mlp) ---------------
# Parameter counts at MobileVLM-1.7B widths, computed from each architecture by hand.
DV, DT, GRID = 1024, 2048, 24


def _lin(i, o, bias=True):
    return i * o + (o if bias else 0)


def _ln(d):
    return 2 * d


def _attn(d, kv=None):  # q, k, v, out projections, all biased
    return 2 * _lin(d, d) + 2 * _lin(kv or d, d)


def _regblock(cin, cout):  # RegNet-Y bottleneck, SE to a quarter of the input width
    r = round(cin / 4)
    n = cin * cout + _ln(cout) + 9 * cout + _ln(cout)  # 1x1 conv + LN, depthwise 3x3 + LN (no conv bias)
    n += _lin(cout, r) + _lin(r, cout)  # squeeze-excite
    n += cout * cout + _ln(cout)  # 1x1 conv + LN
    return n + (0 if cin == cout else cin * cout + _ln(cout))  # 1x1 projection shortcut


def c_abstractor_params(depth=3, hidden_dim=DV, **_):
    return (GRID * GRID * DV  # learned position embedding
            + _regblock(DV, hidden_dim) + (2 * depth - 1) * _regblock(hidden_dim, hidden_dim)
            + _lin(hidden_dim, DT) + _lin(DT, DT))  # readout


def resampler_params(num_queries=144, **_):  # Qwen-VL and MiniCPM-V alike (sin-cos tables are buffers)
    return num_queries * DT + _lin(DV, DT, bias=False) + 3 * _ln(DT) + _attn(DT) + _lin(DT, DT, bias=False)


def qformer_params(num_queries=32, num_layers=2, hidden_dim=768, cross_attention_every=2, **_):
    h = hidden_dim
    n = num_queries * h + _ln(h) + _ln(DV) + _lin(h, DT)  # queries + their LN, ln_vision, output Linear
    for i in range(num_layers):
        n += _attn(h) + _ln(h) + _lin(h, 4 * h) + _lin(4 * h, h) + _ln(h)  # self-attention, FFN
        if i % cross_attention_every == 0:
            n += _attn(h, DV) + _ln(h)  # cross-attention to the image
    return n


def pixel_shuffle_params(scale=2, **_):
    w = scale * scale * DV
    return _ln(w) + _lin(w, DT) + _lin(DT, DT)


FORMULAS = {"c_abstractor": c_abstractor_params, "resampler": resampler_params,
            "minicpmv_resampler": resampler_params, "qformer": qformer_params,
            "pixel_shuffle_mlp": pixel_shuffle_params}
SURVEY_PARAMS_M = {"c_abstractor": 22.7, "resampler": 23.4}  # /work/shared/reference/integrators.md


@pytest.mark.parametrize("name, kwargs", [
    *((n, {}) for n in sorted(FORMULAS)),
    ("c_abstractor", {"depth": 2, "hidden_dim": 512, "num_tokens": 256}),
    ("resampler", {"num_queries": 256}), ("minicpmv_resampler", {"num_queries": 64}),
    ("qformer", {"num_layers": 6, "cross_attention_every": 1}), ("qformer", {"num_layers": 5}),
    ("pixel_shuffle_mlp", {"scale": 3}),
])
def test_parameter_counts_match_architecture(name, kwargs):
    with torch.device("meta"):
        m = build_integrator(IntegratorConfig(name, kwargs), DV, DT, GRID)
    n = count_parameters(m)
    assert n == FORMULAS[name](**kwargs)
    if not kwargs and name in SURVEY_PARAMS_M:
        assert round(n / 1e6, 1) == SURVEY_PARAMS_M[name]


@pytest.mark.parametrize("side", [12, 16, 8, 5, 24])
def test_c_abstractor_pool_equals_adaptive_avg_pool(side):
    from edgevlm.model.integrators.abstractor import FixedAdaptiveAvgPool2d

    ref = torch.nn.AdaptiveAvgPool2d((side, side))
    pool = FixedAdaptiveAvgPool2d(24, side)
    x = torch.randn(2, 3, 24, 24)
    torch.testing.assert_close(pool(x), ref(x))
    # the same bins: pooling each one-hot image gives each output's weights; equal supports, and
    # values equal to float32 rounding (1/(h*w) vs (1/h)(1/w))
    eye = torch.eye(576).reshape(576, 1, 24, 24)
    got, want = pool(eye), ref(eye)  # [576, 1, side, side]
    assert torch.equal(got != 0, want != 0)
    torch.testing.assert_close(got, want, rtol=2e-7, atol=0)


def test_c_abstractor_non_divisible_token_count():
    m = build_integrator(IntegratorConfig("c_abstractor", {"num_tokens": 256, "depth": 1}), 16, 32, 24).eval()
    assert m.num_tokens(576) == 256 and m(torch.randn(2, 576, 16)).shape == (2, 256, 32)
    assert not [k for k in m.state_dict() if "pool" in k]  # the pooling matrix is derived, not saved


OUT_OF_BLOCK = sorted(FORMULAS)


@pytest.mark.parametrize("name", OUT_OF_BLOCK)
def test_out_of_block_integrators_reject_a_wrong_grid(name):
    m = build_integrator(IntegratorConfig(name), 32, 48, 24)
    with pytest.raises(EdgeVLMError, match="24x24"):
        m(torch.randn(1, 577, 32))  # CLS kept


@pytest.mark.parametrize("name, kwargs, needle", [
    ("c_abstractor", {"num_tokens": 150}, "perfect square"),
    ("c_abstractor", {"num_tokens": 900}, "does not upsample"),
    ("c_abstractor", {"depth": 0}, "depth"),
    ("c_abstractor", {"bogus": 1}, "bad kwargs.*bogus"),
    ("resampler", {"num_queries": 50}, "perfect square"),
    ("resampler", {"num_heads": 5}, "divisor"),
    ("minicpmv_resampler", {"num_queries": 0}, "positive"),
    ("qformer", {"num_layers": 1}, "2..6"),
    ("qformer", {"num_layers": 7}, "2..6"),
    ("qformer", {"cross_attention_every": 3}, "1 or 2"),
    ("pixel_shuffle_mlp", {"scale": 5}, "does not divide the 24x24"),
    ("pixel_shuffle_mlp", {"num_tokens": 144}, "bad kwargs.*num_tokens"),
])
def test_bad_integrator_kwargs_are_user_errors(name, kwargs, needle):
    with pytest.raises(EdgeVLMError, match=needle):
        build_integrator(IntegratorConfig(name, kwargs), 32, 48, 24)


def test_sincos_table_layout():
    from edgevlm.model.integrators.blocks import sincos_2d

    t = sincos_2d(8, 3)  # [9, 8]: token 5 is row 1, column 2
    w = torch.tensor([1.0, 0.01])  # 10000^(-i/2), i < 2
    x, y = 2 * w, 1 * w
    torch.testing.assert_close(t[5], torch.cat([x.sin(), x.cos(), y.sin(), y.cos()]))


def test_resampler_position_embeddings():
    qwen = build_integrator(IntegratorConfig("resampler", {"num_queries": 16}), 32, 48, 24)
    cpm = build_integrator(IntegratorConfig("minicpmv_resampler", {"num_queries": 10}), 32, 48, 24)
    assert qwen.pos_q.shape == (16, 48) and qwen.pos_k.shape == (576, 48)
    assert not hasattr(cpm, "pos_q") and cpm.num_tokens(576) == 10  # keys only: any query count
    for m in (qwen, cpm):
        assert not [k for k in m.state_dict() if k.startswith("pos_")]  # fixed tables, not weights
    assert build_integrator(IntegratorConfig("minicpmv_resampler"), 32, 256, 24).num_heads == 2  # 128 wide


def test_qformer_cross_attention_layers():
    def pattern(**kw):
        m = build_integrator(IntegratorConfig("qformer", kw), 32, 48, 24)
        return [layer.cross_attn is not None for layer in m.layers]

    assert pattern() == [True, False]  # BLIP-2: every 2nd layer, starting with the first
    assert pattern(num_layers=5) == [True, False, True, False, True]
    assert pattern(num_layers=3, cross_attention_every=1) == [True, True, True]


def test_pixel_shuffle_groups_blocks_in_row_then_column_order():
    from edgevlm.model.integrators.pixel_shuffle import space_to_depth

    g, s, c = 6, 2, 3
    x = torch.arange(g * g * c, dtype=torch.float32).reshape(1, g * g, c)
    y = space_to_depth(x, g, s, c)  # [1, 9, 12]
    img = x.reshape(g, g, c)
    for row in range(g // s):
        for col in range(g // s):
            want = torch.cat([img[row * s + dy, col * s + dx] for dy in range(s) for dx in range(s)])
            assert torch.equal(y[0, row * (g // s) + col], want)


@pytest.mark.parametrize("name", OUT_OF_BLOCK)
def test_out_of_block_integrators_train_every_parameter(name):
    m = build_integrator(IntegratorConfig(name), 32, 48, 24)
    m(torch.randn(2, 576, 32)).square().mean().backward()
    assert [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_linear_as_gelu_mlp_is_exact():
    """The GGUF `mlp` rewrite of `linear`: GELU(z) - GELU(-z) = z, for erf and tanh GELU."""
    m = build_integrator(IntegratorConfig("linear"), 32, 48, 24).double()
    up, down = m.gguf_mlp_layers()
    x = torch.randn(2, 576, 32, dtype=torch.float64) * 3
    for approximate in ("none", "tanh"):
        y = down(torch.nn.functional.gelu(up(x), approximate=approximate))
        torch.testing.assert_close(y, m(x), rtol=1e-12, atol=1e-12)
