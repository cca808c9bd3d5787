"""llama.cpp's own tools on a GGUF bundle with their default flags (issue 19): ``llama-mtmd-cli`` and
``llama-server``, built from the llama.cpp sources vendored in the pinned llama-cpp-python
(tests/llamacpp_tools.py, cached), answer held-out ShapesVQA questions as edgevlm's ``llamacpp``
backend does, and format the prompt the runtime builds. The only flags added make them greedy and
short (``--temp 0``, ``-n``, a seed) and keep them on one thread of the shared test machine.

A GGUF carrying a chat template llama.cpp has no built-in twin for makes llama-mtmd-cli refuse it
(the user-facing failure this guards against). A failed build of the tools fails these tests; with
``EDGEVLM_SKIP_LLAMACPP_TOOLS=1`` they use already built tools or skip (tests/llamacpp_tools.py).
"""
from __future__ import annotations

import base64
import dataclasses
import json
import socket
import subprocess
import time
import urllib.request

import pytest

pytest.importorskip("torch")
pytest.importorskip("gguf", reason="GGUF export needs the gguf package (pip install 'edgevlm[export]')")
pytest.importorskip("llama_cpp", reason="the llamacpp backend needs llama-cpp-python (pip install 'edgevlm[llamacpp]')")

from conftest import split_records  # noqa: E402

pytestmark = pytest.mark.slow  # the first run builds the tools (minutes); later runs take about 2 minutes

N_QUESTIONS = 8
MAX_NEW = 12
THREADS = 1
GREEDY = ("--temp", "0", "--seed", "0", "-n", str(MAX_NEW), "-t", str(THREADS))


@pytest.fixture(scope="session")
def llama_tools():
    from llamacpp_tools import tools_for_tests

    return tools_for_tests()  # a failed build fails the tests; EDGEVLM_SKIP_LLAMACPP_TOOLS=1 opts out


@pytest.fixture(scope="module")
def exported(trained_tiny, tmp_path_factory):
    from edgevlm.export.common import load_for_export
    from edgevlm.export.to_gguf import export_gguf

    model = load_for_export(str(trained_tiny))
    return model, export_gguf(model, tmp_path_factory.mktemp("gguf-tools") / "b", ["f16"], progress=False)


@pytest.fixture(scope="module")
def questions(trained_data) -> list[tuple[str, str]]:
    """(image path, question text) of held-out records; the test split rotates question types."""
    from edgevlm.runtime.chat import IMAGE_TOKEN

    recs = split_records(trained_data, "test")[:N_QUESTIONS]
    return [(str(r.image_path), r.turns[0][0].replace(IMAGE_TOKEN, "").strip()) for r in recs]


@pytest.fixture(scope="module")
def edgevlm_answers(exported, questions) -> list[str]:
    from edgevlm.runtime import Runtime

    with Runtime.load(exported[1], backend="llamacpp", quant="f16", threads=THREADS) as rt:
        return [rt.generate(image, q, max_new_tokens=MAX_NEW).text.strip() for image, q in questions]


def mtmd_cli(tools, bundle, image: str, question: str, *flags: str, llm: str = "llm-f16.gguf"):
    cmd = [str(tools / "llama-mtmd-cli"), "-m", str(bundle / llm), "--mmproj", str(bundle / "mmproj-f16.gguf"),
           "--image", image, "-p", question, *GREEDY, *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_bundle_readme_and_manifest_name_both_commands(exported):
    from edgevlm.runtime.manifest import read_manifest

    bundle = exported[1]
    usage = read_manifest(bundle).target_info.llama_cpp_usage
    assert usage.cli.startswith("llama-mtmd-cli -m llm-f16.gguf --mmproj mmproj-f16.gguf --image")
    assert "--jinja" not in usage.cli and usage.server == "llama-server -m llm-f16.gguf --mmproj mmproj-f16.gguf"
    readme = (bundle / "README.md").read_text()
    assert usage.cli in readme and usage.server in readme and json.loads(usage.request)


def test_mtmd_cli_default_command_answers_as_the_llamacpp_backend(llama_tools, exported, questions,
                                                                 edgevlm_answers):
    got = []
    for image, q in questions:
        r = mtmd_cli(llama_tools, exported[1], image, q)
        assert r.returncode == 0, r.stderr[-2000:]
        got.append(r.stdout.strip())
    assert got == edgevlm_answers
    assert len(set(got)) > 1  # the answers depend on the image and question


def test_mtmd_cli_formats_the_prompt_the_runtime_builds(llama_tools, exported, questions):
    from edgevlm.runtime.chat import IMAGE_TOKEN, TEMPLATES

    image, q = questions[0]
    r = mtmd_cli(llama_tools, exported[1], image, q, "-n", "1", "-v")
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(s for s in r.stderr.splitlines() if "formatted_chat.prompt:" in s)
    want = TEMPLATES[exported[0].cfg.chat_template].render([(f"{IMAGE_TOKEN}\n{q}", None)])
    assert want.replace(IMAGE_TOKEN, "<__media__>") in r.stderr, line


def test_mtmd_cli_refuses_a_gguf_whose_template_llama_cpp_does_not_know(llama_tools, exported, questions):
    """The failure a user met: a GGUF with the ``vicuna_v1`` Jinja (no llama.cpp built-in renders it).
    The command such a bundle's README gives (``--jinja``, the marker and a newline first) formats
    the prompt the runtime builds."""
    from edgevlm.export.gguf_llm import write_llm
    from edgevlm.runtime.chat import IMAGE_TOKEN, TEMPLATES

    model, bundle = exported
    own = model.cfg.chat_template
    model.cfg.chat_template = "vicuna_v1"
    try:
        write_llm(model, bundle / "llm-vicuna_v1.gguf")
    finally:
        model.cfg.chat_template = own
    try:
        image, q = questions[0]
        r = mtmd_cli(llama_tools, bundle, image, q, llm="llm-vicuna_v1.gguf")
        jinja = mtmd_cli(llama_tools, bundle, image, f"<__media__>\\n{q}", "--jinja", "-n", "1", "-v",
                         llm="llm-vicuna_v1.gguf")
    finally:
        (bundle / "llm-vicuna_v1.gguf").unlink()
    assert r.returncode != 0 and "template is not supported" in r.stderr
    assert jinja.returncode == 0, jinja.stderr[-2000:]
    want = TEMPLATES["vicuna_v1"].render([(f"{IMAGE_TOKEN}\n{q}", None)])
    assert want.replace(IMAGE_TOKEN, "<__media__>") in jinja.stderr


# --- llama-server ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(llama_tools, exported, tmp_path_factory):
    bundle = exported[1]
    port = _free_port()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(llama_tools / "llama-server"), "-m", str(bundle / "llm-f16.gguf"),
                                 "--mmproj", str(bundle / "mmproj-f16.gguf"), "--host", "127.0.0.1",
                                 "--port", str(port), "-t", str(THREADS)], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"llama-server did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_server_renders_the_runtime_template(server, exported):
    from edgevlm.runtime.chat import TEMPLATES

    t = TEMPLATES[exported[0].cfg.chat_template]
    msgs = [{"role": "user", "content": "Is there a red circle?"}, {"role": "assistant", "content": "yes"},
            {"role": "user", "content": "How many shapes?"}]
    turns = [("Is there a red circle?", "yes"), ("How many shapes?", None)]
    assert _post(f"{server}/apply-template", {"messages": msgs})["prompt"] == t.render(turns)
    system = [{"role": "system", "content": "Answer briefly."}, msgs[0]]
    want = dataclasses.replace(t, system="Answer briefly.").render([(msgs[0]["content"], None)])
    assert _post(f"{server}/apply-template", {"messages": system})["prompt"] == want


def test_server_chat_endpoint_answers_as_the_llamacpp_backend(server, questions, edgevlm_answers):
    got = []
    for image, q in questions:
        png = base64.b64encode(open(image, "rb").read()).decode()
        body = {"messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                    {"type": "text", "text": q}]}],
                "temperature": 0, "seed": 0, "max_tokens": MAX_NEW}
        got.append(_post(f"{server}/v1/chat/completions", body)["choices"][0]["message"]["content"].strip())
    assert got == edgevlm_answers
