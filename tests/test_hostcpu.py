"""The CPU class that decides whether an int8 format is accurate (u8 x s8 saturates on x86 without VNNI)."""
import platform

import pytest

from edgevlm.runtime import hostcpu


@pytest.mark.parametrize("machine, flags, cls, saturates", [
    ("x86_64", ["avx2", "fma"], "x86-avx2", True),
    ("x86_64", ["avx2", "avx512f", "avx512bw"], "x86-avx512", True),
    ("x86_64", ["avx2", "avx512f", "avx512_vnni"], "x86-vnni", False),
    ("x86_64", ["avx2", "avx_vnni"], "x86-vnni", False),  # Alder Lake and later: VNNI without AVX-512
    # Arm classes from /proc/cpuinfo Features (the files tests/arm64/cpuinfo.py writes for qemu's models)
    ("aarch64", ["asimd"], "arm64-neon", False),  # cortex-a57
    ("aarch64", ["asimd", "asimddp"], "arm64-dotprod", False),  # neoverse-n1, cortex-a76
    ("aarch64", ["asimd", "asimddp", "i8mm", "sve"], "arm64-i8mm", False),  # qemu max
    ("aarch64", [], "arm64", False),  # no feature list (macOS)
])
def test_cpu_class(monkeypatch, machine, flags, cls, saturates):
    monkeypatch.setattr(platform, "machine", lambda: machine)
    assert hostcpu.cpu_class(flags) == cls
    assert hostcpu.u8s8_saturates(flags) is saturates


def test_flags_of_this_host_are_known_names():
    flags = hostcpu.cpu_flags()
    assert set(flags) <= set(hostcpu.FLAGS)
    if platform.machine() == "x86_64":
        assert hostcpu.cpu_class().startswith("x86")


def test_usable_cpus_is_the_affinity_mask_where_there_is_one():
    import os

    n = hostcpu.usable_cpus()
    assert n >= 1
    if hasattr(os, "sched_getaffinity"):
        assert n == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("given, expected", [(None, "all"), (0, "all"), (1, 1), (3, 3)])
def test_threads_zero_or_none_mean_every_usable_core(given, expected):
    assert hostcpu.resolve_threads(given) == (hostcpu.usable_cpus() if expected == "all" else expected)


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True])
def test_bad_thread_counts_are_refused(bad):
    from edgevlm.runtime.errors import EdgeVLMError

    with pytest.raises(EdgeVLMError, match="threads must be an integer >= 0"):
        hostcpu.resolve_threads(bad)
