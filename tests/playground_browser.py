"""Helpers of tests/test_playground.py: the system Chromium (installed from Debian's packages where
missing and allowed), ``edgevlm serve`` apps in a thread, and what the tests do in the page."""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import REPO

KEY = "playground-key"
MAX_TOKENS = 24
WAIT_MS = 60_000  # for any one thing to appear in the page: nothing may hang
ARTIFACTS = Path(os.environ.get("EDGEVLM_TEST_ARTIFACTS", REPO / "test-artifacts"))
CHAT = "/v1/chat/completions"
DONE = "#log li.assistant[data-state=done]"


def chromium() -> str:
    """The system Chromium; Debian's package is installed first where it is missing and we may."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("no chromium on PATH, and not root with apt-get to install it: apt-get install chromium")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=600", "chromium"]):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)
        if p.returncode != 0:
            pytest.skip(f"chromium could not be installed ({' '.join(cmd)} exited {p.returncode}): "
                        f"{p.stderr.strip()[-300:]}")
    found = shutil.which("chromium")
    assert found, "apt-get installed chromium but it is not on PATH"
    return found



class Served:
    """``edgevlm serve`` arguments built as the CLI builds them, served by uvicorn in a thread."""

    def __init__(self, argv: list[str]):
        from edgevlm.cli import build_parser
        from edgevlm.runtime.serve.background import BackgroundServer
        from edgevlm.runtime.serve.cli import build

        args = build_parser("serve").parse_args(["serve", *argv])
        self.app, self.rt = build(args)
        self.background = BackgroundServer(self.app).start()
        self.url = self.background.url

    def answer(self, body: dict, key: str | None = None) -> httpx.Response:
        """The API's (non-streamed) reply to ``body``."""
        body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(f"{self.url}{CHAT}", json=body, headers=headers, timeout=WAIT_MS / 1000)

    def pieces(self, body: dict) -> list[str]:
        """The non-empty text pieces the API streams for ``body``, in order."""
        out = []
        with httpx.stream("POST", f"{self.url}{CHAT}", json={**body, "stream": True},
                          timeout=WAIT_MS / 1000) as r:
            for line in r.iter_lines():
                choices = json.loads(line[len("data: "):]).get("choices") if line.startswith("data: {") else None
                text = choices[0]["delta"].get("content") if choices else None
                if text:
                    out.append(text)
        return out

    @contextmanager
    def slow(self, delay: float):
        """Each decode step ``delay`` s longer while inside (to stop an answer half-way)."""
        inner = self.rt.backend
        self.rt.backend = SlowDecode(inner, delay)
        try:
            yield
        finally:
            self.rt.backend = inner

    def stop(self) -> None:
        self.background.stop()
        self.rt.close()


class SlowDecode:
    """A real backend whose decode steps sleep first; everything else is the backend's own."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay = inner, delay

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decode(self, token_id):
        time.sleep(self.delay)
        return self.inner.decode(token_id)


def png(path: Path, seed: int = 0) -> Path:
    """Two flat shapes (the random model answers such an image in text; noise gets it to emit
    byte tokens, which the server holds back until they form characters)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (240, 180), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    x, y = rng.integers(10, 60, 2)
    draw.ellipse((x, y, x + 70, y + 70), fill=(220, 40, 40))
    draw.rectangle((130, 60, 200, 130), fill=(40, 90, 220))
    image.save(path)
    return path


def data_uri(path: Path, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(path.read_bytes()).decode()}"


def open_page(page, url: str, max_tokens: int = MAX_TOKENS) -> None:
    page.goto(f"{url}/")
    page.wait_for_selector("#model:has-text('backend')")  # /v1/models and /health answered
    page.fill("#max-tokens", str(max_tokens))


def ask(page, question: str, press_enter: bool = True) -> dict:
    """Ask ``question`` in the page; the JSON body the page sent to the API."""
    page.fill("#question", question)
    with page.expect_request(lambda r: r.url.endswith(CHAT)) as sent:
        if press_enter:
            page.press("#question", "Enter")
        else:
            page.click("#send")
    return sent.value.post_data_json


def poll(page, expression: str) -> None:
    """Wait until ``expression`` is true in the page (Playwright's wait_for_function evaluates
    strings, which the page's Content-Security-Policy forbids)."""
    for _ in range(WAIT_MS // 50):
        if page.evaluate(expression):
            return
        page.wait_for_timeout(50)
    raise AssertionError(f"{expression} still false after {WAIT_MS} ms")


def record_answers(page) -> None:
    """Keep every text the last assistant message shows, in order (window.answerTexts)."""
    page.evaluate("""() => {
        window.answerTexts = [];
        new MutationObserver(() => {
            const last = document.querySelector('#log li.assistant:last-child .text');
            const texts = window.answerTexts;
            if (last && last.textContent !== texts[texts.length - 1]) texts.push(last.textContent);
        }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
    }""")


def assistant_texts(page) -> list[str]:
    return page.eval_on_selector_all("#log li.assistant .text", "ps => ps.map(p => p.textContent)")


def save_screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    print(f"\n  screenshot: {path}")
    return path
