"""What the Arm64 tests share: the environment as a test fixture (a failure to build it fails the
test, unless ``EDGEVLM_SKIP_ARM`` opts out), the cross-built llama.cpp likewise, the questions, and
one call that runs bundles on x86 and under emulation and returns the Arm-vs-x86 metrics."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import build_env  # noqa: E402
import cross_llamacpp  # noqa: E402
import emulate  # noqa: E402
import parity  # noqa: E402
from paths import SKIP_ENV, ArmEnvError  # noqa: E402

FULL_ENV = "EDGEVLM_ARM_FULL"  # set by `make test-arm64`
PROMPTS = ("How many shapes are there?", "What colour is the circle?")


def skipping() -> bool:
    return os.environ.get(SKIP_ENV, "") not in ("", "0")


def env_for_tests() -> Path:
    """The environment's root, built if needed. A failure to build is the test's failure (the one
    line names what to install), unless ``SKIP_ENV`` is set: then only a built one is used."""
    if skipping():
        root = build_env.found()
        if root is None:
            pytest.skip(f"the Arm64 environment is not built and {SKIP_ENV}={os.environ[SKIP_ENV]} says not to "
                        "build it (unset it to build it: about a minute of downloads)")
        return root
    try:
        return build_env.build()
    except ArmEnvError as e:
        pytest.fail(f"the Arm64 environment did not build: {e}\nSet {SKIP_ENV}=1 to skip the Arm tests.",
                    pytrace=False)


def llama_lib_for_tests(level: str) -> Path:
    """The cross-built llama.cpp of ``level`` (built if needed: ~15-20 min), same policy."""
    found = cross_llamacpp.built(level)
    if found or skipping():
        if not found:
            pytest.skip(f"llama.cpp for {level} is not cross-built and {SKIP_ENV} says not to build it")
        return found
    try:
        return cross_llamacpp.build(level)
    except ArmEnvError as e:
        pytest.fail(f"llama.cpp for {level} did not cross-build: {e}", pytrace=False)


def cases(shapes_dir: Path, n_images: int = 2) -> list[dict]:
    """n_images test images x PROMPTS."""
    return [{"image": str(shapes_dir / "images" / f"test_{i:06d}.png"), "prompt": p}
            for i in range(n_images) for p in PROMPTS]


def arm_vs_x86(env_root: Path, cls: str, bundles: dict, cases_: list, steps: int, work: Path,
               llama_lib: Path | None = None, reference_bundles: dict | None = None) -> dict:
    """name -> Arm-vs-x86 metrics (``parity.compare``). x86 runs ``reference_bundles`` (default:
    the same bundles), the Arm class ``cls`` runs ``bundles`` fed the x86 tokens."""
    ref_dir, arm_dir = work / "x86", work / cls
    tokens = parity.reference(reference_bundles or bundles, cases_, steps, ref_dir)
    parity.arm_dump(env_root, cls, bundles, cases_, steps, tokens, arm_dir, llama_lib=llama_lib)
    return {name: parity.compare(ref_dir, arm_dir, name, len(cases_)) for name in bundles}


def report(backend: str, cls: str, results: dict) -> dict:
    """Print one line per bundle; returns name -> goal misses."""
    misses = {}
    for name, m in results.items():
        misses[name] = parity.goal_misses(backend, name, m)
        print(f"  {backend:<8} {parity.line(name, cls, m)}" + (f"  MISSES {misses[name]}" if misses[name] else ""))
    return misses


def record(cls: str, backend: str, results: dict) -> None:
    """Append the metrics to ``$EDGEVLM_ARM_RECORD`` (a JSONL file) when it is set (docs/arm64.md)."""
    import json

    path = os.environ.get("EDGEVLM_ARM_RECORD")
    if not path:
        return
    with open(path, "a") as f:
        for name, m in results.items():
            keep = {k: v for k, v in m.items() if k != "comparisons"}
            f.write(json.dumps({"arm_class": cls, "qemu_cpu": emulate.CLASSES[cls].qemu_cpu, "backend": backend,
                                "precision": name, "misses": parity.goal_misses(backend, name, m), **keep}) + "\n")


__all__ = ["emulate", "parity", "cases", "arm_vs_x86", "report", "env_for_tests", "llama_lib_for_tests", "FULL_ENV"]
