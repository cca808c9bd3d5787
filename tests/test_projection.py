"""Device profiles and the latency projection: profiles are complete and sourced, the roofline
behaves (more bandwidth -> faster decode, bigger models -> more memory), calibration inverts
projection exactly, and the published-number validation produces finite ratios."""
from __future__ import annotations

import math

import pytest

from edgevlm.benchmarks import projection as pj
from edgevlm.benchmarks.flops import preset_shape, stage_costs


@pytest.fixture(scope="module")
def devices():
    return pj.load_devices()


@pytest.fixture(scope="module")
def mobilevlm():
    return preset_shape("mobilevlm-1.7b")


REQUIRED = {"jetson-agx-orin-64gb", "jetson-orin-nx-16gb", "jetson-orin-nano-8gb", "jetson-orin-nano-super-8gb",
            "snapdragon-888", "snapdragon-8-gen-3", "apple-a17-pro", "h100-sxm", "host"}


def test_profiles_are_complete_and_sourced(devices):
    assert REQUIRED <= set(devices)
    for name, d in devices.items():
        assert d["sources"] and all(isinstance(s, str) and len(s) > 20 for s in d["sources"]), name
        assert d["default_engine"] in d["engines"], name
        for eng in d["engines"].values():
            assert eng["class"] in ("cpu", "gpu", "npu")
        if d.get("measured"):
            continue
        assert d["memory_bandwidth_gbs"] > 0 and 0 < d["usable_memory_gb"] <= d["memory_gb"], name
        assert all(e["compute_tflops"] > 0 for e in d["engines"].values()), name


def test_projection_follows_bandwidth_and_precision(devices, mobilevlm):
    q4 = stage_costs(mobilevlm, "q4_k_m", n_text=32, n_new=32)
    f16 = stage_costs(mobilevlm, "f16", n_text=32, n_new=32)
    nano, agx = devices["jetson-orin-nano-8gb"], devices["jetson-agx-orin-64gb"]
    p_nano, p_agx = pj.project(q4, nano), pj.project(q4, agx)
    assert p_nano["bound"]["decode"] == "bandwidth" and p_nano["bound"]["vision"] == "compute"
    ratio = p_agx["decode_tok_s"] / p_nano["decode_tok_s"]
    assert ratio == pytest.approx(agx["memory_bandwidth_gbs"] / nano["memory_bandwidth_gbs"], rel=1e-6)
    assert pj.project(f16, nano)["decode_tok_s"] < p_nano["decode_tok_s"]
    assert p_nano["ttft_ms"] == pytest.approx(p_nano["vision_ms"] + p_nano["prefill_ms"])
    assert p_nano["decode_tok_s"] <= p_nano["decode_bound_tok_s"]


def test_memory_verdicts(devices, mobilevlm):
    small = pj.project(stage_costs(mobilevlm, "q4_k_m"), devices["jetson-orin-nano-8gb"])["memory"]
    assert small["verdict"] == "fits"
    big = pj.project(stage_costs(preset_shape("mobilevlm-3b"), "fp32"), devices["jetson-orin-nano-8gb"])["memory"]
    assert big["verdict"] == "does not fit" and big["needed_mb"] > small["needed_mb"]
    assert big["needed_full_context_mb"] >= big["needed_mb"]


def _host_record(costs: dict, env: dict, vision_ms: float, prefill_ms: float, decode: float, rid: str) -> dict:
    """A measured-looking record (plain data, as run.py writes it)."""
    return {"type": "case", "status": "ok", "id": rid, "backend": "llamacpp", "costs": costs,
            "limits": {"cache_resident": False},
            "metrics": {"vision_ms": {"median": vision_ms}, "prefill_ms": {"median": prefill_ms},
                        "ttft_ms": {"median": vision_ms + prefill_ms}, "decode_tok_s": {"median": decode}}}


def test_calibration_inverts_the_projection(devices, mobilevlm):
    env = {"bandwidth": {"read_gbs": 20.0}, "gemm_fp32_gflops": 100.0, "ram_gb": 24, "cores": {"usable": 2}}
    host = pj.host_device(devices["host"], env)
    costs = stage_costs(mobilevlm, "q4_k_m", n_text=32, n_new=32)
    rec = _host_record(costs, env, 4000.0, 3000.0, 15.0, "a")
    factors = pj.calibrate([rec], host)["llamacpp"]
    p = pj.project(costs, host, efficiency=factors)
    assert p["vision_ms"] == pytest.approx(4000.0) and p["prefill_ms"] == pytest.approx(3000.0)
    assert p["decode_tok_s"] == pytest.approx(15.0)
    # leave-one-out: each record is projected with the other's factors
    other = _host_record(costs, env, 5000.0, 3000.0, 12.0, "b")
    rows = pj.host_validation([rec, other], host)
    assert [r["id"] for r in rows] == ["a", "b"]
    assert rows[0]["decode_tok_s"]["ratio"] == pytest.approx(12.0 / 15.0)
    assert pj.calibrate([{**rec, "limits": {"cache_resident": True}}], host) == {}


def test_bf16_stages_use_the_hosts_measured_bf16_rate(devices, mobilevlm):
    """A host that runs bf16 GEMMs 4x faster than fp32 (oneDNN with AMX) projects a bf16 case's
    compute-bound stages 4x faster; a stack calibrated on fp32 then fits its bf16 case too."""
    env = {"bandwidth": {"read_gbs": 20.0}, "gemm_fp32_gflops": 100.0, "gemm_bf16_gflops": 400.0, "ram_gb": 24,
           "cores": {"usable": 2}}
    host = pj.host_device(devices["host"], env)
    assert host["engines"]["cpu"]["tflops"] == {"fp32": 0.1, "bf16": 0.4}
    fp32, bf16 = (stage_costs(mobilevlm, p, n_text=32, n_new=32) for p in ("fp32", "bf16"))
    a, b = pj.project(fp32, host), pj.project(bf16, host)
    assert b["bound"]["vision"] == a["bound"]["vision"] == "compute"
    assert a["vision_ms"] / b["vision_ms"] == pytest.approx(4.0)
    assert a["prefill_ms"] / b["prefill_ms"] == pytest.approx(4.0)
    rec = _host_record(fp32, env, 4000.0, 3000.0, 5.0, "fp32")
    factors = pj.calibrate([rec], host)["llamacpp"]
    p = pj.project(bf16, host, efficiency=factors)
    assert p["vision_ms"] == pytest.approx(1000.0) and p["prefill_ms"] == pytest.approx(750.0)
    no_bf16 = pj.host_device(devices["host"], {**env, "gemm_bf16_gflops": None})
    assert pj.project(bf16, no_bf16)["vision_ms"] == pytest.approx(a["vision_ms"])  # falls back to fp32


def test_published_validation_has_finite_ratios(devices):
    rows = pj.published_validation(devices)
    primary = {r["device"] for r in rows if r["primary"]}
    assert {"jetson-agx-orin-64gb", "snapdragon-888"} <= primary
    for r in rows:
        ratios = [v["ratio"] for v in r.values() if isinstance(v, dict) and "ratio" in v]
        assert ratios and all(math.isfinite(x) and x > 0 for x in ratios), r


def test_video_row_is_projected_and_follows_the_device(devices):
    rows = {r["device"]: r for r in pj.video_projection(devices)}
    nano, agx = rows[devices["jetson-orin-nano-8gb"]["name"]], rows[devices["jetson-agx-orin-64gb"]["name"]]
    assert all(r["label"] == "projected" and r["answers_per_s"] == pytest.approx(1e3 / r["answer_ms"]) for r in rows.values())
    assert agx["answers_per_s"] > nano["answers_per_s"] > 0
    one = pj.project(stage_costs(preset_shape("mobilevlm-1.7b"), "q4_k_m", n_text=16, n_new=8),
                     devices["jetson-orin-nano-8gb"])
    assert nano["answer_ms"] > one["ttft_ms"]  # a frame's answer costs its TTFT plus the decode steps
