"""``edgevlm serve``: real uvicorn on 127.0.0.1, the real ``openai`` client and httpx, real ONNX
Runtime and llama.cpp bundles of the small tiny model. Answers equal ``Runtime.generate``; a
follow-up turn does not re-encode the image; bad input gets an OpenAI-shaped 4xx and the server
keeps serving (the queue, disconnects, load and the command line: test_serve_load.py). No timing
assertions."""
from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402
from slow_backend import SlowBackend  # noqa: E402

from edgevlm.runtime import Runtime  # noqa: E402

KEY = "test-key"
MODEL = "tiny-test"
TIMEOUT = 60  # seconds, for every client call: nothing may hang


# --- helpers ----------------------------------------------------------------------------------------


def _image(seed: int = 0, size=(300, 220)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size[::-1], 3), dtype=np.uint8))


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _data_uri(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def _user(text: str, *urls: str) -> dict:
    return {"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in urls),
                                        {"type": "text", "text": text}]}


class Served:
    """``edgevlm serve`` arguments, parsed and built as the CLI does, served in a thread by uvicorn on a
    free loopback port (runtime.serve.background)."""

    def __init__(self, argv: list[str], slow: float = 0.0):
        from edgevlm.cli import build_parser
        from edgevlm.runtime.serve.background import BackgroundServer
        from edgevlm.runtime.serve.cli import build

        args = build_parser("serve").parse_args(["serve", *argv])
        self.app, self.rt = build(args)
        if slow:
            self.rt.backend = SlowBackend(self.rt.backend, decode_delay=slow)
        self.background = BackgroundServer(self.app).start()
        self.url = self.background.url

    def client(self, **kw) -> "openai.OpenAI":
        return openai.OpenAI(**{"base_url": f"{self.url}/v1", "api_key": KEY, "max_retries": 0, "timeout": TIMEOUT, **kw})

    def post(self, body, key: str = KEY, raw: bytes | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        if raw is not None:
            return httpx.post(f"{self.url}/v1/chat/completions", content=raw, headers=headers, timeout=TIMEOUT)
        return httpx.post(f"{self.url}/v1/chat/completions", json=body, headers=headers, timeout=TIMEOUT)

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=TIMEOUT).text
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        assert m, f"{name} not in /metrics"
        return float(m.group(1))

    def stop(self) -> None:
        self.background.stop()
        self.rt.close()


def _serve(bundle, backend: str, tmp_path, *extra: str, slow: float = 0.0) -> Served:
    """``edgevlm serve`` without --backend: the bundle's manifest picks ``backend``."""
    threads = ["--threads", "1"]
    served = Served(["--bundle", str(bundle), "--model-name", MODEL, "--api-key", KEY,
                     "--image-root", str(tmp_path), *threads, *extra], slow=slow)
    assert served.rt.backend.name == backend
    return served


# --- fixtures: bundles and servers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model(serve_model):
    return serve_model  # conftest: one per session, shared by test_serve*.py


@pytest.fixture(scope="module")
def onnx_bundle(serve_onnx_bundle):
    return serve_onnx_bundle


@pytest.fixture(scope="module")
def gqa_bundle(small_model, tmp_path_factory):
    """The GroupQueryAttention decoder: its KV cache is updated in place (another prefix path)."""
    from edgevlm.export.to_onnx import export_onnx

    return export_onnx(small_model, tmp_path_factory.mktemp("serve_gqa") / "b", exporter="torchscript",
                       attention="gqa", token_check=0, progress=False)


@pytest.fixture(scope="module")
def gguf_bundle(serve_gguf_bundle):
    return serve_gguf_bundle


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    _image(5).save(root / "inside.png")
    return root


@pytest.fixture(scope="module")
def ort_server(onnx_bundle, image_root):
    s = _serve(onnx_bundle, "ort", image_root, "--max-image-mb", "0.25", "--max-pixels", "300000",
               "--max-queue", "2", "--max-images", "1")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def gguf_server(gguf_bundle, image_root):
    s = _serve(gguf_bundle, "llamacpp", image_root)
    yield s
    s.stop()


def _reference(bundle, backend: str):
    return Runtime.load(bundle, backend=backend, threads=1)


# --- the runtime's caches --------------------------------------------------------------------------


def test_image_cache_is_bounded_in_bytes_and_keyed_by_content():
    from edgevlm.runtime.cache import ImageCache, image_key

    cache = ImageCache(max_bytes=3 * 400)
    a, b = np.zeros((3, 8, 8), np.float32), np.ones((3, 8, 8), np.float32)
    assert image_key(a) == image_key(a.copy()) != image_key(b)
    for i in range(5):
        cache.put(f"k{i}", np.full((10, 10), i, np.float32))  # 400 bytes each
    assert len(cache) == 3 and cache.n_bytes == 1200
    assert cache.get("k0") is None and cache.get("k4")[0, 0] == 4  # least recently used went first
    cache.put("big", np.zeros((100, 100), np.float32))  # larger than the whole cache: not kept
    assert cache.get("big") is None and cache.n_bytes == 1200


@pytest.mark.parametrize("backend, fixture", [("ort", "onnx_bundle"), ("ort", "gqa_bundle"),
                                              ("llamacpp", "gguf_bundle")])
def test_runtime_prefix_reuse_keeps_the_answers(backend, fixture, request):
    bundle = request.getfixturevalue(fixture)
    from edgevlm.runtime.generate import GenerationConfig

    img = _image(4)
    with Runtime.load(bundle, backend=backend, image_cache_mb=0, threads=1) as fresh, \
            Runtime.load(bundle, backend=backend, prefix_reuse=True, threads=1) as reuse:
        assert getattr(reuse.backend, "in_place", False) == (fixture == "gqa_bundle")
        first = [rt.generate(img, "What colour is the circle?", max_new_tokens=10) for rt in (fresh, reuse)]
        assert first[0].token_ids == first[1].token_ids and first[1].cache.prefix_reused == 0
        turns = [("<image>\nWhat colour is the circle?", first[0].text), ("Is there a square?", None)]
        config = GenerationConfig(max_new_tokens=10)
        second = ["".join(rt.stream_ids(rt.chat_ids(turns), rt.pixel_values(img), config)) for rt in (fresh, reuse)]
        again = reuse.generate(img, "What colour is the circle?", max_new_tokens=10)
    assert second[0] == second[1]
    assert again.token_ids == first[0].token_ids
    assert again.cache.images_cached == 1 and again.cache.images_encoded == 0
    assert again.cache.prefix_reused >= 150  # system prompt + the image's 144 visual tokens, at least


# --- answers equal Runtime.generate -----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["ort", "llamacpp"])
def test_plain_and_streamed_answers_equal_runtime_generate(backend, request, tmp_path):
    server = request.getfixturevalue("ort_server" if backend == "ort" else "gguf_server")
    bundle = request.getfixturevalue("onnx_bundle" if backend == "ort" else "gguf_bundle")
    img, question = _image(1), "What colour is the circle?"
    path = tmp_path / "q.png"
    img.save(path)
    with _reference(bundle, backend) as rt:
        want = rt.generate(str(path), question, max_new_tokens=12)
    client = server.client()
    messages = [_user(question, _data_uri(path.read_bytes()))]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == want.text and want.text
    assert r.choices[0].finish_reason == ("stop" if want.finish_reason == "eos" else "length")
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.prompt_tokens == want.timings.n_prompt_tokens + want.timings.n_visual_tokens

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_stream_ends_with_done_in_sse_format(ort_server):
    body = {"model": MODEL, "messages": [_user("Hello")], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{ort_server.url}/v1/chat/completions", json=body, timeout=TIMEOUT,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]" and lines.count("data: [DONE]") == 1


def test_two_turn_conversation_encodes_the_image_once(ort_server, onnx_bundle):
    client = ort_server.client()
    img = _png(_image(7))
    first_q = [_user("What colour is the circle?", _data_uri(img))]
    encoded = ort_server.metric("edgevlm_images_encoded_total")
    hits = ort_server.metric("edgevlm_prefix_cache_hits_total")
    a1 = client.chat.completions.create(model=MODEL, messages=first_q, max_tokens=8, temperature=0)
    turn2 = first_q + [{"role": "assistant", "content": a1.choices[0].message.content},
                       {"role": "user", "content": "Is there a square?"}]
    a2 = client.chat.completions.create(model=MODEL, messages=turn2, max_tokens=8, temperature=0)
    assert ort_server.metric("edgevlm_images_encoded_total") == encoded + 1
    assert ort_server.metric("edgevlm_prefix_cache_hits_total") >= hits + 1
    assert a2.usage.prompt_tokens_details.cached_tokens > 0
    assert a2.model_extra["timings"]["images_cached"] == 1
    with _reference(onnx_bundle, "ort") as rt:  # a fresh runtime, no caches warm: the same answer
        ids = rt.chat_ids([("<image>\nWhat colour is the circle?", a1.choices[0].message.content),
                           ("Is there a square?", None)])
        from edgevlm.runtime.generate import GenerationConfig

        want = rt.stream_ids(ids, rt.pixel_values(img), GenerationConfig(max_new_tokens=8))
        assert a2.choices[0].message.content == "".join(want)


# --- bad input: OpenAI-shaped 4xx, and the server keeps serving ----------------------------------------


def _bad_cases(image_root) -> dict:
    png = _png(_image(2))
    ok = lambda *urls, text="What colour is it?": {"model": MODEL, "messages": [_user(text, *urls)]}  # noqa: E731
    return {
        "malformed JSON": (dict(raw=b'{"model": "tiny-test", "messages": ['), 400, None),
        "missing messages": (dict(body={"model": MODEL}), 400, None),
        "non-image data URI": (dict(body=ok(_data_uri(b"hello", "text/plain"))), 400, None),
        "data URI that is no image": (dict(body=ok(_data_uri(b"hello, not a png"))), 400, "not an image"),
        "truncated image": (dict(body=ok(_data_uri(png[: len(png) // 2]))), 400, "truncated"),
        "bad base64": (dict(body=ok("data:image/png;base64,@@@@")), 400, "base64"),
        "image over --max-image-mb": (dict(body=ok(_data_uri(_png(_image(3, (400, 300)))))), 413, "max-image-mb"),
        "image over the pixel limit": (dict(body=ok(_data_uri(_png(Image.new("RGB", (700, 700)))))), 400,
                                       "decompression bomb"),
        "two images": (dict(body=ok(_data_uri(png), _data_uri(png))), 400, "at most 1"),
        "prompt over the context": (dict(body=ok(text="red " * 1100)), 400, r"\d+ tokens .*context is 1024 positions"),
        "wrong API key": (dict(body=ok(), key="wrong"), 401, "API key"),
        "path outside --image-root": (dict(body=ok(str(image_root.parent / "elsewhere.png"))), 403, "image-root"),
        "parent dir escape": (dict(body=ok("../inside.png")), 403, "image-root"),
        "URL": (dict(body=ok("https://example.com/cat.png")), 400, "not fetched"),
        "bad top_p": (dict(body={**ok(), "temperature": 0.5, "top_p": 2}), 400, "top_p"),
        "assistant first": (dict(body={"model": MODEL, "messages": [{"role": "assistant", "content": "x"},
                                                                   _user("hi")]}), 400, "alternate"),
        "ends with the assistant": (dict(body={"model": MODEL, "messages": [
            _user("hi"), {"role": "assistant", "content": "x"}]}), 400, "last message"),
        "n=2": (dict(body={**ok(), "n": 2}), 400, r"^n: "),
    }


def test_bad_inputs_get_openai_errors_and_the_server_keeps_serving(ort_server, image_root):
    good = {"model": MODEL, "messages": [_user("What is it?", str(image_root / "inside.png"))], "max_tokens": 2}
    for name, (kw, status, pattern) in _bad_cases(image_root).items():
        r = ort_server.post(**({"body": None} | kw))
        assert r.status_code == status, (name, r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], name
        if pattern:
            assert re.search(pattern, err["message"]), (name, err["message"])
        ok = ort_server.post(good)
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None, name
    assert 'status="500"' not in httpx.get(f"{ort_server.url}/metrics", timeout=TIMEOUT).text


def test_openai_client_sees_the_errors(ort_server):
    client = ort_server.client()
    with pytest.raises(openai.AuthenticationError):
        ort_server.client(api_key="nope").chat.completions.create(model=MODEL, messages=[_user("hi")])
    other = client.chat.completions.create(model="other", messages=[_user("hi")], max_tokens=2)
    assert other.model == MODEL  # lenient by default, like llama-server (--strict-model: test_serve_api.py)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=MODEL, messages=[_user("red " * 1100)])
    assert client.chat.completions.create(model=MODEL, messages=[_user("hi")], max_tokens=2).choices
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(f"{ort_server.url}/health").json()["status"] == "ok"
