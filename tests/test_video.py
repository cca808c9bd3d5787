"""Video sources (runtime/video.py) on real videos written with PyAV from ShapesVQA frames: exact
sampling in source time, the newest-frame-wins buffer, and bad sources (a camera that is not there, a
URL that does not answer, corrupt and truncated files) as one clear line and exit 2 from the CLI.
No model here (test_watch.py asks questions); no timing assertions."""
from __future__ import annotations

import socket

import numpy as np
import pytest

pytest.importorskip("av")

from edgevlm.runtime.video import (  # noqa: E402
    Frame, LatestFrame, LiveFrames, VideoError, exact_frames, open_container, source_kind,
)
from edgevlm.runtime.watch import frame_change, thumbnail  # noqa: E402
from edgevlm.train.data.shapes_video import colour_index, write_video  # noqa: E402

FPS, SECONDS, HOLD = 10, 2.0, 0.5  # 20 frames, the colour changes at frames 5, 10, 15


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """A lossless (ffv1) 48-pixel ShapesVQA clip: static within each colour, so unchanged is exact."""
    out = tmp_path_factory.mktemp("video") / "shapes.mkv"
    write_video(str(out), SECONDS, FPS, HOLD, side=48, codec="ffv1")
    return out


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_exact_sampling_in_source_time(video):
    every = list(exact_frames(str(video)))
    assert [f.index for f in every] == list(range(int(SECONDS * FPS)))
    assert [f.time_s for f in every] == pytest.approx([i / FPS for i in range(len(every))])
    assert every[0].image.shape == (48, 48, 3) and every[0].image.dtype == np.uint8
    sampled = list(exact_frames(str(video), every_s=HOLD))
    assert [f.index for f in sampled] == [0, 5, 10, 15]
    assert [f.index for f in exact_frames(str(video), every_s=0.35)] == [0, 4, 7, 11, 14, 18]  # 0.35 k rounded up


def test_the_frames_change_exactly_when_the_colour_does(video):
    frames = list(exact_frames(str(video)))
    thumbs = [thumbnail(f.image) for f in frames]
    changes = [frame_change(a, b) for a, b in zip(thumbs, thumbs[1:])]
    switches = [i + 1 for i, c in enumerate(changes) if c > 0]
    colours = [colour_index(i / FPS, HOLD, 6) for i in range(len(frames))]
    assert switches == [i for i in range(1, len(frames)) if colours[i] != colours[i - 1]]
    assert switches == [5, 10, 15]
    assert min(changes[i - 1] for i in switches) > 2  # a colour change is far from zero


def test_latest_frame_wins_and_counts_what_it_dropped():
    buf = LatestFrame()
    frames = [Frame(np.zeros((2, 2, 3), np.uint8), i / 10, i) for i in range(4)]
    for f in frames[:3]:
        buf.put(f)
    got, dropped = buf.take()
    assert got.index == 2 and dropped == 2
    with pytest.raises(TimeoutError):
        buf.take(timeout=0.01)  # nothing newer
    buf.put(frames[3])
    buf.close()
    assert buf.take() == (frames[3], 0)  # a frame put before the end is still handed out
    assert buf.take() is None
    failed = LatestFrame()
    failed.close(VideoError("boom"))
    with pytest.raises(VideoError, match="boom"):
        failed.take()


def test_live_reader_hands_out_every_frame_to_a_fast_consumer_in_order(video):
    with LiveFrames(str(video), realtime=False) as live:
        got = list(live)
    seen = [f.index for f, _ in got]
    assert seen == sorted(seen) and seen[-1] == int(SECONDS * FPS) - 1
    assert sum(d for _, d in got) + len(got) == int(SECONDS * FPS)  # every frame taken or counted dropped


def test_live_reader_stops_on_close(video):
    live = LiveFrames(str(video), realtime=True)
    live.take()
    live.close()
    assert not live._thread.is_alive()


@pytest.mark.parametrize("make, message", [
    (lambda tmp: "/dev/video9", "no such camera device"),
    (lambda tmp: f"http://127.0.0.1:{closed_port()}/live.mp4", "did not answer"),
    (lambda tmp: f"rtsp://127.0.0.1:{closed_port()}/cam", "did not answer"),
    (lambda tmp: str(tmp / "missing.mp4"), "no such video file"),
    (lambda tmp: "ftp://example.com/a.mp4", "unsupported URL scheme"),
])
def test_bad_sources_are_one_clear_error(tmp_path, make, message):
    source = make(tmp_path)
    with pytest.raises(VideoError, match=message) as e:
        open_container(source, timeout_s=5)
    assert "\n" not in str(e.value) and source in str(e.value)


def test_corrupt_truncated_and_frameless_files_are_clear_errors(video, tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError, match="not a readable video"):
        open_container(str(corrupt))
    text = tmp_path / "notes.mkv"
    text.write_text("not a video at all\n" * 20)
    with pytest.raises(VideoError, match="not a readable video"):
        list(exact_frames(str(text)))
    header_only = tmp_path / "header.mkv"
    header_only.write_bytes(video.read_bytes()[:600])  # the container header, no whole frame
    with pytest.raises(VideoError, match="no frame could be decoded|not a readable video|decoding failed"):
        list(exact_frames(str(header_only)))
    assert source_kind("/dev/video0") == "device" and source_kind("rtsp://h/x") == "url"
    assert source_kind(str(video)) == "file"


@pytest.mark.parametrize("source", ["/dev/video9", "http://127.0.0.1:{port}/live.mp4", "{corrupt}"])
def test_cli_bad_source_exits_2_with_one_line(tmp_path, capsys, source):
    from edgevlm.cli import main

    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(3000))
    source = source.format(port=closed_port(), corrupt=corrupt)
    code = main(["watch", "--bundle", str(tmp_path / "no-bundle"), "--source", source, "--prompt", "hi",
                 "--timeout", "5"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("edgevlm watch: error: ") and source in err


def test_an_exception_in_the_decoder_thread_reaches_the_consumer(video, monkeypatch):
    import edgevlm.runtime.video as v

    def broken(container, source, max_side):
        yield Frame(np.zeros((2, 2, 3), np.uint8), 0.0, 0)
        raise VideoError(f"{source}: decoding failed after 1 frame(s) (test)")

    monkeypatch.setattr(v, "_decoded", broken)
    with LiveFrames(str(video), realtime=False) as live:
        with pytest.raises(VideoError, match="decoding failed"):
            while live.take(timeout=5) is not None:
                pass
    assert not live._thread.is_alive()
