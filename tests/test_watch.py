"""``Runtime.watch`` / ``edgevlm watch`` on a real ONNX bundle of the small tiny model and a real video
written with PyAV from ShapesVQA frames (the shapes change colour every 0.5 s): each answer equals
``Runtime.generate`` on the same frame, unchanged frames are not asked again, stale frames are dropped
under a slow backend, K-frame questions, the caches reused. No timing assertions."""
from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("av")

from PIL import Image  # noqa: E402
from slow_backend import SlowBackend  # noqa: E402

from edgevlm.runtime import Runtime  # noqa: E402
from edgevlm.runtime.errors import ContextLengthError  # noqa: E402
from edgevlm.runtime.video import exact_frames  # noqa: E402
from edgevlm.train.data.shapes_video import write_video  # noqa: E402

FPS, SECONDS, HOLD = 10, 2.0, 0.5  # 20 frames; the colour changes at frames 5, 10, 15
N_FRAMES = int(FPS * SECONDS)
TOKENS = 5


@pytest.fixture(scope="module")
def bundle(serve_onnx_bundle):
    """conftest's session ONNX bundle of the small tiny model (one export shared with test_serve*.py)."""
    return serve_onnx_bundle


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip") / "shapes.mkv"
    info = write_video(str(out), SECONDS, FPS, HOLD, side=64, codec="ffv1")  # lossless: static frames are equal
    return out, info["question"]


@pytest.fixture(scope="module")
def rt(bundle):
    with Runtime.load(bundle, threads=1) as r:
        yield r


def decoded(clip) -> list[np.ndarray]:
    """The clip's frames, decoded independently of the watch loop."""
    return [f.image for f in exact_frames(str(clip[0]))]


def test_each_answer_equals_generate_on_the_same_frame(rt, bundle, clip):
    results = list(rt.watch(str(clip[0]), clip[1], every_s=HOLD, max_new_tokens=TOKENS))
    assert [r.index for r in results] == [0, 5, 10, 15] and all(r.asked and r.dropped == 0 for r in results)
    frames = decoded(clip)
    with Runtime.load(bundle, threads=1, image_cache_mb=0) as fresh:
        expected = [fresh.generate(Image.fromarray(frames[r.index]), clip[1], max_new_tokens=TOKENS).text
                    for r in results]
    assert [r.answer for r in results] == expected
    assert len(set(expected)) > 1  # the answers depend on the frame: a wrong frame would be caught
    assert all(set(r.timings) == {"vision_ms", "prefill_ms", "ttft_ms", "decode_tok_s", "total_ms"} for r in results)
    line = json.loads(results[0].to_json())
    assert line["index"] == 0 and line["time_s"] == 0.0 and line["answer"] == expected[0] and "frame" not in line


def test_unchanged_frames_are_not_asked_again(rt, clip):
    results = list(rt.watch(str(clip[0]), clip[1], min_change=1.0, max_new_tokens=TOKENS))
    assert [r.index for r in results] == list(range(N_FRAMES))  # one result per frame
    assert [r.index for r in results if r.asked] == [0, 5, 10, 15]  # only where the colour changed
    last = None
    for r in results:
        if r.asked:
            last = r
            continue
        assert r.answer == last.answer and r.timings == {} and r.change == 0.0  # no model time


def test_stale_frames_are_dropped_under_a_slow_backend(rt, clip):
    inner = rt.backend
    rt.backend = SlowBackend(inner, prefill_delay=0.35)  # ~3.5 frame intervals per answer at 10 fps
    try:
        results = list(rt.watch(str(clip[0]), clip[1], realtime=True, max_new_tokens=2))
    finally:
        rt.backend = inner
    indices = [r.index for r in results]
    assert sum(r.dropped for r in results) + len(results) == N_FRAMES  # nothing queued, nothing lost
    assert sum(r.dropped for r in results) > 0 and len(results) < N_FRAMES
    assert indices[-1] == N_FRAMES - 1  # the newest frame at the end of the source is still answered
    for prev, r in zip(results, results[1:]):
        assert r.index - prev.index - 1 == r.dropped  # the frame taken is always the newest one


def test_several_frames_in_one_question(rt, bundle, clip):
    with Runtime.load(bundle, threads=1) as own:  # an empty image cache
        results = list(own.watch(str(clip[0]), clip[1], every_s=HOLD, frames=2, max_new_tokens=TOKENS))
    assert [r.frames for r in results] == [[0, 5], [5, 10], [10, 15]]
    frames = decoded(clip)
    for r in results:
        images = [Image.fromarray(frames[i]) for i in r.frames]
        assert r.answer == rt.generate(images, clip[1], max_new_tokens=TOKENS).text
    # the older frame's visual tokens come from the image cache, only the new one is encoded
    assert [(r.cache["images_cached"], r.cache["images_encoded"]) for r in results] == [(0, 2), (1, 1), (1, 1)]
    with pytest.raises(ContextLengthError, match=r"at most \d+ frame\(s\) fit"):
        next(rt.watch(str(clip[0]), clip[1], frames=50))


def test_prefix_reuse_across_frames(bundle, clip):
    with Runtime.load(bundle, threads=1, prefix_reuse=True) as r:
        results = list(r.watch(str(clip[0]), clip[1], every_s=HOLD, max_new_tokens=TOKENS))
    assert results[0].cache["prefix_reused"] == 0
    assert all(x.cache["prefix_reused"] > 0 for x in results[1:])  # the template's text before the image


def test_cli_prints_one_json_line_per_answer(bundle, clip, capsys):
    from edgevlm.cli import main

    code = main(["watch", "--bundle", str(bundle), "--source", str(clip[0]), "--prompt", clip[1], "--every", "0.5",
                 "--count", "3", "--threads", "1", "--max-new-tokens", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0 and len(lines) == 3
    rows = [json.loads(x) for x in lines]
    assert [r["index"] for r in rows] == [0, 5, 10] and all(isinstance(r["answer"], str) for r in rows)
    assert {"time_s", "wall_time", "dropped", "timings", "frames", "asked"} <= set(rows[0])


# --- the server: video_url parts and several images, through the real openai client -----------------

KEY, MODEL = "watch-key", "tiny-watch"


@pytest.fixture(scope="module")
def server(bundle, clip):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from edgevlm.cli import build_parser
    from edgevlm.runtime.serve.background import BackgroundServer
    from edgevlm.runtime.serve.cli import build

    args = build_parser("serve").parse_args(["serve", "--bundle", str(bundle), "--model-name", MODEL, "--api-key", KEY,
                                             "--image-root", str(clip[0].parent), "--threads", "1",
                                             "--max-video-frames", "40"])
    app, rt = build(args)
    bg = BackgroundServer(app).start()
    yield bg.url
    bg.stop()
    rt.close()


def _client(url):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


def _data_uri(data: bytes, media: str) -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def _ask(client, question: str, *parts: dict):
    content = [*parts, {"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    return client.chat.completions.create(model=MODEL, max_tokens=TOKENS, messages=messages)


def test_server_answers_about_a_video_as_its_sampled_frames(server, rt, clip):
    client = _client(server)
    frames = decoded(clip)
    sampled = [Image.fromarray(frames[i]) for i in np.round(np.linspace(0, len(frames) - 1, 4)).astype(int)]
    expected = rt.generate(sampled, clip[1], max_new_tokens=TOKENS).text
    by_data = _ask(client, clip[1], {"type": "video_url", "video_url": {"url": _data_uri(clip[0].read_bytes(),
                                                                                         "video/x-matroska")}})
    by_path = _ask(client, clip[1], {"type": "video_url", "video_url": {"url": clip[0].name}})
    assert by_data.choices[0].message.content == expected == by_path.choices[0].message.content
    assert by_data.usage.prompt_tokens > 4 * 144  # four frames' visual tokens
    # several image_url parts in one conversation: the limit follows the model's context, not 1
    two = [Image.fromarray(frames[0]), Image.fromarray(frames[10])]
    pngs = []
    for img in two:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        pngs.append({"type": "image_url", "image_url": {"url": _data_uri(buf.getvalue(), "image/png")}})
    got = _ask(client, clip[1], *pngs).choices[0].message.content
    assert got == rt.generate(two, clip[1], max_new_tokens=TOKENS).text


def test_server_refuses_bad_video_clearly_and_keeps_serving(server, clip, tmp_path):
    openai = pytest.importorskip("openai")
    client = _client(server)
    data = clip[0].read_bytes()
    long_clip = clip[0].parent / "long.mkv"
    write_video(str(long_clip), 5.0, FPS, HOLD, side=32, codec="ffv1")  # 50 frames > --max-video-frames 40
    cases = [
        (_data_uri(np.random.default_rng(0).bytes(5000), "video/mp4"), "not a readable video"),
        (_data_uri(data[: len(data) // 3], "video/x-matroska"), "decod|truncated|readable"),
        (_data_uri(b"\x89PNG....", "image/png"), "is not a video"),
        ("https://example.com/clip.mp4", "not fetched"),
        (long_clip.name, "50 frames, over the server's limit of 40"),
        ("../outside.mp4", "outside the server's --image-root"),
    ]
    for url, message in cases:
        with pytest.raises(openai.APIStatusError) as e:
            _ask(client, "What changed?", {"type": "video_url", "video_url": {"url": url}})
        assert 400 <= e.value.status_code < 500, url[:40]
        assert re.search(message, e.value.body["message"]), (url[:40], e.value.body["message"])
    video = {"type": "video_url", "video_url": {"url": clip[0].name}}
    with pytest.raises(openai.BadRequestError, match="at most 6"):  # 2 videos = 8 frames > 6 that fit 1024
        _ask(client, "What changed?", video, video)
    assert _ask(client, "What changed?", video).choices[0].message.content is not None  # still serving
