"""The CPU class that decides whether an int8 format is accurate (u8 x s8 saturates on x86 without VNNI)."""
import platform

import pytest

from edgevlm.runtime import hostcpu


@pytest.mark.parametrize("machine, flags, cls, saturates", [
    ("x86_64", ["avx2", "fma"], "x86-avx2", True),
    ("x86_64", ["avx2", "avx512f", "avx512bw"], "x86-avx512", True),
    ("x86_64", ["avx2", "avx512f", "avx512_vnni"], "x86-vnni", False),
    ("x86_64", ["avx2", "avx_vnni"], "x86-vnni", False),  # Alder Lake and later: VNNI without AVX-512
    ("aarch64", ["asimd", "asimddp"], "arm64", False),
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
