"""Next-token selection: greedy, seeded sampling, top-k/top-p, repetition penalty, presence/frequency
penalties and logit_bias (on real backends too: test_constrain.py)."""
from __future__ import annotations

import numpy as np
import pytest

from edgevlm.runtime.chat import IMAGE_TOKEN_INDEX
from edgevlm.runtime.errors import EdgeVLMError
from edgevlm.runtime.sampling import (
    SamplingConfig,
    adjust_logits,
    apply_logit_bias,
    apply_presence_frequency,
    apply_repetition_penalty,
    pick,
    select_token,
    top_k_mask,
    top_p_mask,
)


def test_greedy_is_argmax_with_ties_to_lowest_id():
    logits = np.array([0.1, 3.0, -1.0, 3.0], np.float32)
    assert select_token(logits, SamplingConfig()) == 1


def test_sampling_is_reproducible_by_seed():
    logits = np.random.default_rng(0).standard_normal(50).astype(np.float32)
    cfg = SamplingConfig(do_sample=True, temperature=1.5)

    def draw(seed):
        rng = np.random.default_rng(seed)
        return [select_token(logits, cfg, rng) for _ in range(30)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_sampling_follows_the_softmax():
    logits = np.log(np.array([0.6, 0.3, 0.1], np.float32))
    rng = np.random.default_rng(0)
    counts = np.bincount(
        [select_token(logits, SamplingConfig(do_sample=True), rng) for _ in range(3000)]
    )
    np.testing.assert_allclose(counts / 3000, [0.6, 0.3, 0.1], atol=0.04)


def test_top_k_and_top_p_masks():
    logits = np.log(np.array([0.05, 0.5, 0.15, 0.3], np.float32))
    assert top_k_mask(logits, 2).tolist() == [False, True, False, True]
    assert top_k_mask(logits, 0).all()
    assert top_p_mask(logits, 0.7).tolist() == [False, True, False, True]  # 0.5 + 0.3 reaches 0.7
    assert top_p_mask(logits, 0.81).tolist() == [False, True, True, True]
    assert top_p_mask(logits, 1e-6).tolist() == [False, True, False, False]  # keeps at least one
    rng = np.random.default_rng(0)
    cfg = SamplingConfig(do_sample=True, top_k=2, temperature=5.0)
    assert {select_token(logits, cfg, rng) for _ in range(300)} == {1, 3}
    cfg = SamplingConfig(do_sample=True, top_p=0.6, temperature=1.0)
    assert {select_token(logits, cfg, rng) for _ in range(300)} == {1, 3}


def test_repetition_penalty_direction():
    logits = np.array([2.0, -2.0, 1.5, 0.0], np.float32)
    out = apply_repetition_penalty(logits, [0, 1, IMAGE_TOKEN_INDEX], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.5, 0.0]
    assert logits[0] == 2.0  # input not modified
    assert select_token(logits, SamplingConfig(repetition_penalty=2.0), context=[0]) == 2


@pytest.mark.parametrize(
    "kw",
    [
        dict(do_sample=True, temperature=0.0),
        dict(top_p=0.0),
        dict(top_k=-1),
        dict(repetition_penalty=0),
        dict(presence_penalty=2.5),
        dict(frequency_penalty=-3),
        dict(logit_bias={-1: 1.0}),
        dict(logit_bias={"5": 1.0}),
        dict(logit_bias={5: 101}),
    ],
)
def test_bad_sampling_settings_are_user_errors(kw):
    with pytest.raises(EdgeVLMError):
        SamplingConfig(**kw).validate()


def test_nan_logits_are_reported():
    with pytest.raises(EdgeVLMError, match="NaN"):
        select_token(np.array([0.0, np.nan], np.float32), SamplingConfig())


def test_generation_config_holds_a_sampling_config():
    from edgevlm.runtime.generate import GenerationConfig

    flat = GenerationConfig(max_new_tokens=5, do_sample=True, temperature=0.7, top_k=4, seed=9, stop="x")
    nested = GenerationConfig(5, SamplingConfig(do_sample=True, temperature=0.7, top_k=4, seed=9), ("x",))
    assert flat == nested and flat.sampling == SamplingConfig(do_sample=True, temperature=0.7, top_k=4, seed=9)
    assert GenerationConfig().sampling == SamplingConfig()
    with pytest.raises(TypeError):
        GenerationConfig(sampling=SamplingConfig(), seed=1)
    with pytest.raises(TypeError):
        GenerationConfig(temprature=0.5)


def test_presence_and_frequency_penalties_follow_openai():
    """logit[j] -= count[j] * frequency + (count[j] > 0) * presence, counted over the output only."""
    logits = np.zeros(5, np.float32)
    out = apply_presence_frequency(logits, [1, 1, 3, 9], presence=0.5, frequency=1.0)  # 9: past the vocab
    assert out.tolist() == [0.0, -2.5, 0.0, -1.5, 0.0] and not logits.any()
    assert apply_presence_frequency(logits, [1], 0.0, 0.0) is logits
    cfg = SamplingConfig(presence_penalty=-1.0, repetition_penalty=1.0)  # negative: encourage repeats
    assert adjust_logits(np.array([1.0, 0.5], np.float32), cfg, context=[0], generated=[1]).tolist() == [1.0, 1.5]
    assert select_token(np.array([1.0, 0.5], np.float32), cfg, generated=[1]) == 1


def test_logit_bias_adds_and_bans():
    logits = np.array([2.0, 1.0, 0.0], np.float32)
    assert apply_logit_bias(logits, {0: -100.0, 2: 0.5}).tolist() == [-98.0, 1.0, 0.5]
    assert select_token(logits, SamplingConfig(logit_bias={0: -100})) == 1
    rng = np.random.default_rng(0)
    cfg = SamplingConfig(do_sample=True, logit_bias={0: -100, 1: -100})
    assert {select_token(logits, cfg, rng) for _ in range(200)} == {2}
    with pytest.raises(EdgeVLMError, match="vocabulary has 3"):
        apply_logit_bias(logits, {3: 1.0})


def test_pick_refuses_when_nothing_is_allowed():
    with pytest.raises(EdgeVLMError, match="banned"):
        pick(np.full(3, -np.inf, np.float32), SamplingConfig())
    assert pick(np.array([-np.inf, 0.0, -np.inf], np.float32), SamplingConfig(do_sample=True, top_k=2),
                np.random.default_rng(0)) == 1


@pytest.mark.parametrize("temperature", [1e-4, 1e-40, 5e-324])
def test_tiny_temperature_and_penalty_stay_finite(temperature, monkeypatch):
    """A tiny temperature is greedy in effect (no overflow, no NaN); a tiny repetition penalty saturates."""
    from edgevlm.runtime import sampling

    logits = np.random.default_rng(3).standard_normal(64).astype(np.float32) * 20
    logits[5] = -np.inf  # a masked token stays out
    cfg = SamplingConfig(do_sample=True, temperature=temperature, top_p=0.9, top_k=10)
    with np.errstate(all="raise", under="ignore"):  # underflow to 0 probability is fine
        picks = {pick(logits, cfg, np.random.default_rng(s)) for s in range(5)}
        assert picks == {int(np.argmax(logits))}
        x = apply_repetition_penalty(logits, [7], 1e-40)
        assert np.isfinite(x[7]) and (x[7] > 0) == (logits[7] > 0)
    # the plain float32 division this replaces overflows (the check above would have failed)
    if temperature > 1e-38:  # float32 division overflows below its smallest normal number
        return
    monkeypatch.setattr(sampling, "temperature_scaled", lambda x, t: x / np.float32(t))
    with np.errstate(all="raise", under="ignore"), pytest.raises(FloatingPointError):
        pick(logits, cfg, np.random.default_rng(0))
