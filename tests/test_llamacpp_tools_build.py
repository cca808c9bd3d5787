"""tests/llamacpp_tools.py's failure policy, on real cmake runs over small broken source trees
(seconds, not the 20-minute llama.cpp build): a build that fails raises with the log's tail, the
test fixture turns that into a failure, and ``EDGEVLM_SKIP_LLAMACPP_TOOLS`` opts out without building."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from llamacpp_tools import SKIP_ENV, TARGETS, ToolsUnavailable, build, cache_dir, tools_for_tests

needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("c++") is None,
                                 reason="these build tests run cmake and c++, as the tools' build does")


def broken_sources(root: Path, *, configure_error: bool = False) -> Path:
    """A CMake project with both targets, whose C++ does not compile (or whose configure step fails)."""
    src = root / "src-broken"
    src.mkdir(parents=True)
    fail = 'message(FATAL_ERROR "edgevlm: configure fails on purpose")\n' if configure_error else ""
    (src / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.14)\nproject(broken LANGUAGES CXX)\n" + fail
        + "".join(f"add_executable({t} main.cpp)\n" for t in TARGETS))
    (src / "main.cpp").write_text("int main() { return edgevlm_broken_on_purpose; }\n")
    return src


@needs_cmake
def test_a_compile_error_raises_with_the_log(tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    with pytest.raises(ToolsUnavailable) as e:
        build(broken_sources(tmp_path), root, jobs=1)
    msg = str(e.value)
    assert "cmake --build failed" in msg and "edgevlm_broken_on_purpose" in msg  # the compiler's error
    assert str(root / "build.log") in msg
    assert not (root / "bin").exists()


@needs_cmake
def test_a_configure_error_raises(tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    with pytest.raises(ToolsUnavailable, match="cmake -S failed(.|\n)*configure fails on purpose"):
        build(broken_sources(tmp_path, configure_error=True), root, jobs=1)


@needs_cmake
def test_a_failed_build_fails_the_test_and_names_the_opt_out(tmp_path, monkeypatch):
    monkeypatch.delenv(SKIP_ENV, raising=False)
    src, root = broken_sources(tmp_path), tmp_path / "cache"
    root.mkdir()
    with pytest.raises(pytest.fail.Exception, match=f"did not build(.|\n)*{SKIP_ENV}=1") as e:
        tools_for_tests(lambda: build(src, root, jobs=1))
    assert "edgevlm_broken_on_purpose" in str(e.value)


def test_opting_out_skips_without_building(tmp_path, monkeypatch):
    monkeypatch.setenv(SKIP_ENV, "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # no tools built there
    calls = []
    with pytest.raises(pytest.skip.Exception, match=f"{SKIP_ENV}=1"):
        tools_for_tests(lambda: calls.append("build"))
    assert calls == []


def test_opting_out_uses_tools_already_built(tmp_path, monkeypatch):
    import importlib.metadata

    try:
        version = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the tools' cache is per llama-cpp-python version; it is not installed (pip install 'edgevlm[llamacpp]')")
    monkeypatch.setenv(SKIP_ENV, "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    bindir = cache_dir(version) / "bin"
    bindir.mkdir(parents=True)
    for t in TARGETS:
        (bindir / t).write_text("")
    assert tools_for_tests(lambda: pytest.fail("must not build")) == bindir
