"""``edgevlm serve`` under pressure and from the command line: a full queue gets 429 and a client
that leaves stops its generation; a bounded load test ends with every request answered or refused;
``edgevlm serve`` answers and stops cleanly on SIGTERM. Real uvicorn, openai client and httpx, as in
test_serve.py (whose bundles, servers and helpers these reuse). No timing assertions."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from test_serve import (  # noqa: E402,F401  (fixtures: small_model, onnx_bundle, image_root, ort_server)
    KEY, MODEL, TIMEOUT, _data_uri, _image, _png, _serve, _user, image_root, onnx_bundle, ort_server, small_model,
)

# --- the queue, disconnects, load -------------------------------------------------------------------


@pytest.fixture
def slow_server(onnx_bundle, image_root):
    s = _serve(onnx_bundle, "ort", image_root, "--max-queue", "0", slow=0.02)
    yield s
    s.stop()


def test_full_queue_429_and_a_client_that_leaves_stops_its_generation(slow_server):
    s = slow_server
    long = {"model": MODEL, "messages": [_user("Tell me everything.")], "max_tokens": 800, "stream": True}
    with httpx.stream("POST", f"{s.url}/v1/chat/completions", json=long, timeout=TIMEOUT,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # (a dropped iterator would close the connection)
        next(lines)  # running now (~16 s at this backend's speed)
        busy = s.post({"model": MODEL, "messages": [_user("hi")], "max_tokens": 2})
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["type"] == "rate_limit_error"
    deadline = time.monotonic() + TIMEOUT  # the client left: its generation stops
    while s.metric("edgevlm_cancelled_total") < 1:
        assert time.monotonic() < deadline, "generation was not cancelled"
        time.sleep(0.1)
    assert s.metric("edgevlm_completion_tokens_total") < 800
    assert s.post({"model": MODEL, "messages": [_user("hi")], "max_tokens": 2}).status_code == 200


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_bounded_load_every_request_completes_or_gets_429(ort_server):
    img = _data_uri(_png(_image(11)))

    def client_run(i: int) -> list[str]:
        client, out = ort_server.client(), []
        for j in range(3):
            try:
                stream = client.chat.completions.create(
                    model=MODEL, messages=[_user(f"Question {i}.{j}: what colour?", img)], max_tokens=6,
                    temperature=0, stream=True)
                chunks = list(stream)
                out.append("ok" if chunks[-1].choices[0].finish_reason in ("stop", "length") else "bad")
            except openai.RateLimitError as e:
                out.append("429" if e.response.headers.get("retry-after") else "429 without Retry-After")
            except openai.APIStatusError as e:
                out.append(f"status {e.status_code}")
        return out

    rss = _rss_mb()
    for _ in range(2):  # the second round must not grow memory much beyond the first
        with ThreadPoolExecutor(8) as pool:
            results = [x for xs in pool.map(client_run, range(8), timeout=10 * TIMEOUT) for x in xs]
        assert len(results) == 24 and set(results) <= {"ok", "429"}, results
        assert "ok" in results
        if _ == 0:
            rss = _rss_mb()
    assert _rss_mb() < rss + 100, "memory kept growing under load"
    assert ort_server.metric("edgevlm_queue_depth") == 0
    assert 'status="500"' not in httpx.get(f"{ort_server.url}/metrics").text


# --- the command line: edgevlm serve, SIGTERM ------------------------------------------------------------


def test_edgevlm_serve_command_answers_and_stops_cleanly_on_sigterm(onnx_bundle):
    import signal
    import subprocess
    import sys

    from edgevlm.runtime.serve.background import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "edgevlm.cli", "serve", "--bundle", str(onnx_bundle), "--port", str(port),
           "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + TIMEOUT
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "edgevlm serve did not start"
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        name = onnx_bundle.name  # the default model id
        r = httpx.post(f"{url}/v1/chat/completions", timeout=TIMEOUT, json={
            "model": name, "messages": [_user("hi")], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=TIMEOUT)
        # uvicorn shuts down (lifespan: the worker is joined), then re-raises SIGTERM as servers do
        assert proc.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in out, out
        assert "Traceback" not in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
