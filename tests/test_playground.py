"""The browser playground at ``/`` (issue 38) in a real headless Chromium (Debian's package, driven by
Playwright; no browser download) against real ``edgevlm serve`` apps (uvicorn on 127.0.0.1, an ONNX
bundle of the small tiny model): the page's streamed answer equals the API's answer for the request
the page sent, a follow-up turn works, a corrupt image shows the server's own error message, JSON
mode sends ``response_format``, watch mode answers each camera frame without queueing, ``--api-key``
guards the page and ``--no-ui`` removes it. A screenshot is kept in test-artifacts/.

Chromium is found on PATH; where it is absent and this runs as root with apt-get (a fresh CI machine),
the session installs Debian's ``chromium`` (about a minute); elsewhere these tests skip, saying so.
"""
from __future__ import annotations

import subprocess
import sys
import zipfile
from itertools import accumulate
from pathlib import Path

import pytest

pytest.importorskip("torch")  # the bundle is exported here
pytest.importorskip("onnxruntime")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
sync_api = pytest.importorskip("playwright.sync_api")

from conftest import REPO  # noqa: E402
from playground_browser import (CHAT, DONE, KEY, MAX_TOKENS, WAIT_MS, Served, ask, assistant_texts,  # noqa: E402
                                chromium, data_uri, open_page, png, poll, record_answers, save_screenshot)

MODEL = "tiny-playground"


@pytest.fixture(scope="module")
def bundle(serve_onnx_bundle) -> Path:
    """conftest's ONNX bundle of the small model, exported once per session for every serve test."""
    return serve_onnx_bundle


def serve(bundle: Path, *extra: str):
    served = Served(["--bundle", str(bundle), "--model-name", MODEL, "--threads", "1", *extra])
    yield served
    served.stop()


@pytest.fixture(scope="module")
def server(bundle):
    yield from serve(bundle)


@pytest.fixture(scope="module")
def browser():
    executable = chromium()
    with sync_api.sync_playwright() as p:
        # a fake camera (a moving test pattern) that needs no permission prompt
        b = p.chromium.launch(executable_path=executable, args=["--use-fake-device-for-media-stream",
                                                                 "--use-fake-ui-for-media-stream"])
        yield b
        b.close()


@pytest.fixture
def page(browser, request):
    """A fresh page; fails its test on any script error or request to another origin."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors, foreign = [], []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: r.url.startswith(("http://127.0.0.1:", "data:", "blob:")) or foreign.append(r.url))
    yield page
    context.close()
    assert not errors, f"script errors in the page: {errors}"
    assert not foreign, f"the page reached outside its server: {foreign}"


# --- the page -----------------------------------------------------------------------------------


def test_page_streams_the_api_answer_and_a_follow_up(server, page, tmp_path):
    image = png(tmp_path / "shapes.png")
    open_page(page, server.url)
    page.set_input_files("#file", str(image))
    page.wait_for_selector("#preview:not([hidden])")
    record_answers(page)

    body = ask(page, "What is in the image?")
    page.wait_for_selector(DONE)
    # the page sends the file's own bytes, greedy, streamed
    assert body["messages"] == [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(image)}},
        {"type": "text", "text": "What is in the image?"}]}]
    assert body["stream"] is True and body["temperature"] == 0 and body["max_tokens"] == MAX_TOKENS
    reply = server.answer(body).json()
    first = reply["choices"][0]["message"]["content"]
    assert first and assistant_texts(page) == [first]
    # it was shown piece by piece, as the API streams it
    pieces = server.pieces(body)
    assert len(pieces) > 1 and [t for t in page.evaluate("window.answerTexts") if t] == list(accumulate(pieces))
    timings = page.text_content("#timings")
    assert f"{reply['usage']['completion_tokens']} tokens" in timings and "TTFT" in timings

    body = ask(page, "And what colour is it?", press_enter=False)  # the follow-up, about the same image
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][1]["content"] == first and "image_url" not in str(body["messages"][2])
    page.wait_for_selector(f"{DONE} >> nth=1")
    second = server.answer(body).json()["choices"][0]["message"]["content"]
    assert assistant_texts(page) == [first, second]
    assert "image from cache" in page.text_content("#timings")  # the server's image cache served it
    save_screenshot(page, "playground.png")

    page.click("#new-chat")  # a new conversation starts without the old turns
    assert assistant_texts(page) == []
    body = ask(page, "What is in the image?")
    assert len(body["messages"]) == 1
    page.wait_for_selector(DONE)
    assert assistant_texts(page) == [first]


def test_a_corrupt_image_shows_the_servers_error(server, page, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    open_page(page, server.url)
    page.set_input_files("#file", str(broken))
    body = ask(page, "What is in the image?")
    reply = server.answer(body)
    assert reply.status_code == 400
    message = reply.json()["error"]["message"]
    page.wait_for_selector("#error:not([hidden])")
    assert page.text_content("#error") == message
    # nothing was answered: no messages left, the question is back in the box for another try
    assert assistant_texts(page) == [] and page.input_value("#question") == "What is in the image?"


def test_escape_stops_an_answer_and_keeps_what_came(server, page, tmp_path):
    open_page(page, server.url, max_tokens=200)
    page.set_input_files("#file", str(png(tmp_path / "a.png", seed=5)))
    with server.slow(0.05):  # 200 steps: ten seconds to stop it in
        body = ask(page, "What is in the image?")
        page.wait_for_selector("#log li.assistant[data-state=streaming] .text:not(:empty)")
        page.keyboard.press("Escape")
        page.wait_for_selector("#log li.assistant[data-state=stopped]")
    partial = assistant_texts(page)[0]
    full = server.answer(body).json()["choices"][0]["message"]["content"]
    assert partial and full.startswith(partial) and len(partial) < len(full)
    follow_up = ask(page, "Go on.")  # the partial answer is the conversation's assistant turn
    assert follow_up["messages"][1] == {"role": "assistant", "content": partial}
    page.wait_for_selector(DONE)


def test_json_mode_sends_response_format(server, page, tmp_path):
    open_page(page, server.url)
    page.set_input_files("#file", str(png(tmp_path / "a.png", seed=3)))
    page.check("#json-mode")
    body = ask(page, "Describe the image as JSON.")
    assert body["response_format"] == {"type": "json_object"}
    page.wait_for_selector(DONE)
    shown = assistant_texts(page)
    assert shown == [server.answer(body).json()["choices"][0]["message"]["content"]]
    # the server honours it: a JSON object begins, where the same question without it answers in text
    plain = {k: v for k, v in body.items() if k != "response_format"}
    assert shown[0].startswith("{") and not server.answer(plain).json()["choices"][0]["message"]["content"].startswith("{")
    page.uncheck("#json-mode")
    assert "response_format" not in ask(page, "And in words?")
    page.wait_for_selector(f"{DONE} >> nth=1")


def test_watch_mode_answers_each_frame_without_queueing(server, page):
    open_page(page, server.url, max_tokens=8)
    page.click("#camera-start")  # Chromium's fake camera
    poll(page, "document.getElementById('video').videoWidth > 0")
    in_flight, most = [0], [0]

    def started(r):
        if r.url.endswith(CHAT):
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])

    def ended(r):
        if r.url.endswith(CHAT):
            in_flight[0] -= 1

    page.on("request", started)
    page.on("requestfinished", ended)
    page.on("requestfailed", ended)
    page.fill("#watch-interval", "0.1")  # ticks come faster than answers: frames are skipped, not queued
    page.click("#watch-start")
    page.wait_for_selector("#watch-log li[data-state=done] >> nth=2")
    page.click("#watch-stop")
    page.wait_for_selector("#watch-log li[data-state=streaming]", state="detached")
    assert most[0] == 1  # never two requests at once
    entries = page.eval_on_selector_all("#watch-log li[data-state=done]", """lis => lis.map(li => (
        {frame: li.querySelector('img').src, text: li.querySelector('.text').textContent}))""")
    assert len({e["frame"] for e in entries}) == len(entries) >= 3  # a new frame each time
    for e in entries[:3]:  # each answer is the API's answer about the frame shown beside it
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": e["frame"]}},
                                                          {"type": "text", "text": "What do you see?"}]}],
                "max_tokens": 8, "temperature": 0}
        assert e["text"] == server.answer(body).json()["choices"][0]["message"]["content"]
    save_screenshot(page, "playground-watch.png")


def test_every_control_is_labelled_and_reached_by_keyboard(server, page):
    open_page(page, server.url)
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, textarea, button')]
        .filter(el => !el.hidden && !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                      && !el.textContent.trim())
        .map(el => el.id)""")
    assert unlabelled == []
    reached = []
    for _ in range(30):  # Tab through the page
        page.keyboard.press("Tab")
        reached.append(page.evaluate("document.activeElement.id"))
    assert {"file", "camera-start", "video-file", "question", "json-mode", "max-tokens", "send", "new-chat",
            "watch-prompt", "watch-interval", "watch-start"} <= set(reached)


# --- --api-key and --no-ui ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(bundle):
    yield from serve(bundle, "--api-key", KEY)


def test_the_api_key_guards_the_page(keyed, page):
    for path in ("/", "/static/app.js"):
        assert httpx.get(f"{keyed.url}{path}").status_code == 401
        assert httpx.get(f"{keyed.url}{path}", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    page.goto(f"{keyed.url}/")
    assert page.locator("#ask").count() == 0 and page.locator("#key").count() == 1  # a sign-in form only
    page.fill("#key", "not-the-key")
    page.press("#key", "Enter")
    page.wait_for_selector("#login-error")
    assert page.locator("#ask").count() == 0
    page.fill("#key", KEY)
    page.click("button[type=submit]")
    page.wait_for_selector("#model:has-text('backend')")  # /v1/models and /health answered
    page.fill("#max-tokens", str(MAX_TOKENS))
    body = ask(page, "Hello?")  # no image: a text question, sent with the key
    page.wait_for_selector(DONE)
    assert assistant_texts(page) == [keyed.answer(body, key=KEY).json()["choices"][0]["message"]["content"]]
    assert keyed.answer(body).status_code == 401  # the API itself still wants the key


@pytest.fixture(scope="module")
def headless(bundle):
    yield from serve(bundle, "--no-ui")


def test_no_ui_leaves_only_the_api(headless):
    assert httpx.get(f"{headless.url}/").status_code == 404
    assert httpx.get(f"{headless.url}/static/app.js").status_code == 404
    assert httpx.get(f"{headless.url}/v1/models").json()["data"][0]["id"] == MODEL


def test_the_wheel_ships_the_page(tmp_path):
    """The static files are package data: an installed (non-editable) edgevlm serves the page too."""
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        str(REPO), "-w", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    (wheel,) = tmp_path.glob("edgevlm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    static = REPO / "runtime" / "serve" / "static"
    assert {f"edgevlm/runtime/serve/static/{f.name}" for f in static.iterdir()} <= names
    assert {"index.html", "app.js", "style.css"} <= {f.name for f in static.iterdir()}
