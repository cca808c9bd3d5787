"""Video sources for ``edgevlm watch``: files, RTSP/HTTP stream URLs and V4L2 cameras, decoded with
PyAV (FFmpeg's own libraries, in process; ``pip install 'edgevlm[video]'``).

Two ways to take frames:

- ``exact_frames(source, every_s)``: a file, decoded in order, one frame per ``every_s`` seconds of
  *source* time (the first frame at or after each multiple); nothing is dropped, so a run is
  reproducible whatever the model's speed.
- ``LiveFrames(source)``: a thread decodes into a one-slot ``LatestFrame`` buffer (a new frame
  replaces the one not yet taken); the consumer always gets the newest frame and the number of frames
  it never saw. A file is played at its own frame rate (``realtime``), like a camera.

Bounds: the live buffer holds one decoded frame; a frame's longer side is at most ``max_side`` pixels
(scaled down by FFmpeg while decoding). Opening a URL waits ``timeout_s`` at most, and so does each read.
"""
from __future__ import annotations

import glob
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import EdgeVLMError

URL_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt")
DEVICE_PREFIX = "/dev/video"
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_SIDE = 1280  # a decoded frame's longer side at most (a model takes 336 or less)


class VideoError(EdgeVLMError):
    """A video source could not be opened or decoded (missing device, no answer, not a video)."""


@dataclass
class Frame:
    image: np.ndarray  # uint8 [H, W, 3] RGB
    time_s: float  # source timestamp (seconds from the stream's start; wall-clock based if it has none)
    index: int  # decode order in the source, from 0


def source_kind(source: str) -> str:
    """``"device"`` (V4L2, ``/dev/videoN``), ``"url"`` (a stream URL) or ``"file"``."""
    if source.startswith(DEVICE_PREFIX):
        return "device"
    scheme, sep, _ = source.partition("://")
    if sep and scheme.lower() in URL_SCHEMES:
        return "url"
    if sep and scheme.lower() != "file":
        raise VideoError(f"{source}: unsupported URL scheme {scheme!r}; use a file, /dev/videoN or "
                         f"one of {', '.join(URL_SCHEMES)}")
    return "file"


def _av():
    try:
        import av
    except ImportError:
        raise EdgeVLMError("video sources need PyAV: pip install 'edgevlm[video]'") from None
    return av


def _reason(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return text.split(": '", 1)[0].strip()


def open_container(source: str, timeout_s: float = DEFAULT_TIMEOUT_S):
    """An open PyAV input container with a video stream, or VideoError in one line."""
    av = _av()
    kind = source_kind(source)
    opts: dict = {}
    fmt = None
    if kind == "device":
        if not Path(source).exists():
            found = sorted(glob.glob(DEVICE_PREFIX + "*"))
            raise VideoError(f"{source}: no such camera device (V4L2 devices here: {', '.join(found) or 'none'})")
        fmt = "v4l2"
    elif kind == "file":
        path = source[len("file://"):] if source.startswith("file://") else source
        if not Path(path).is_file():
            raise VideoError(f"{source}: no such video file")
        source = path
    elif source.lower().startswith("rtsp"):
        opts["rtsp_transport"] = "tcp"
    try:
        container = av.open(source, format=fmt, options=opts, timeout=(timeout_s, timeout_s))
    except (av.FFmpegError, OSError) as e:
        what = {"device": "cannot open the camera", "url": "the stream did not answer",
                "file": "not a readable video"}[kind]
        raise VideoError(f"{source}: {what} ({_reason(e)})") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{source}: has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return container


def _scaled_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _decoded(container, source: str, max_side: int) -> Iterator[Frame]:
    """Frames of ``container``'s first video stream as RGB arrays; VideoError on a decode failure."""
    av = _av()
    stream = container.streams.video[0]
    index, t_wall0 = 0, time.monotonic()
    try:
        for frame in container.decode(stream):
            w, h = _scaled_size(frame.width, frame.height, max_side)
            image = frame.to_ndarray(format="rgb24", width=w, height=h)  # [H, W, 3]
            t = frame.time if frame.time is not None else time.monotonic() - t_wall0
            yield Frame(image, float(t), index)
            index += 1
    except (av.FFmpegError, OSError) as e:
        raise VideoError(f"{source}: decoding failed after {index} frame(s) ({_reason(e)})") from None
    if index == 0:
        raise VideoError(f"{source}: no frame could be decoded (empty or corrupt video)")


def exact_frames(source: str, every_s: float | None = None, max_side: int = DEFAULT_MAX_SIDE,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[Frame]:
    """A file's frames, one per ``every_s`` seconds of source time (None or 0: every frame)."""
    if source_kind(source) != "file":
        raise VideoError(f"{source}: exact sampling is for files; a stream or camera is read live")
    container = open_container(source, timeout_s)
    try:
        next_t = None
        for frame in _decoded(container, source, max_side):
            if next_t is not None and frame.time_s < next_t - 1e-6:
                continue
            yield frame
            if every_s:
                next_t = frame.time_s + every_s if next_t is None else next_t + every_s
                while next_t <= frame.time_s + 1e-6:
                    next_t += every_s
            else:
                next_t = None
    finally:
        container.close()


class LatestFrame:
    """A one-slot buffer: ``put`` replaces the frame not yet taken; ``take`` waits for a frame newer
    than the last one taken and says how many frames were replaced unseen since then."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._frame: Frame | None = None
        self._put = 0  # frames put, ever
        self._taken = 0  # value of _put at the last take
        self._closed = False
        self._error: BaseException | None = None

    def put(self, frame: Frame) -> None:
        with self._cond:
            self._frame = frame
            self._put += 1
            self._cond.notify_all()

    def close(self, error: BaseException | None = None) -> None:
        with self._cond:
            self._closed = True
            self._error = self._error or error
            self._cond.notify_all()

    def take(self, timeout: float | None = None) -> tuple[Frame, int] | None:
        """(newest frame, frames dropped before it), or None once the source has ended and every
        frame was taken; the source's error, if it failed; TimeoutError after ``timeout`` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._put > self._taken or self._closed, timeout):
                raise TimeoutError("no new frame")
            if self._put == self._taken:
                if self._error is not None:
                    raise self._error
                return None
            dropped = self._put - self._taken - 1
            self._taken = self._put
            frame, self._frame = self._frame, None
            return frame, dropped

    @property
    def frames_put(self) -> int:
        return self._put


class LiveFrames:
    """Decode ``source`` on a daemon thread into a ``LatestFrame`` (see the module docstring).

    ``realtime``: wait for each frame's timestamp (a file plays at its own rate; a camera or stream
    already does). Use as an iterator of (frame, dropped) or call ``take``; ``close`` stops decoding.
    """

    def __init__(self, source: str, realtime: bool | None = None, max_side: int = DEFAULT_MAX_SIDE,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        self.source = source
        self.realtime = source_kind(source) == "file" if realtime is None else realtime
        self.buffer = LatestFrame()
        self._stop = threading.Event()
        self._container = open_container(source, timeout_s)  # errors at construction, not later
        self._max_side = max_side
        self._thread = threading.Thread(target=self._decode, name=f"decode {source}", daemon=True)
        self._thread.start()

    def _decode(self) -> None:
        error = None
        t_wall0 = t_src0 = None
        try:
            for frame in _decoded(self._container, self.source, self._max_side):
                if self._stop.is_set():
                    break
                if self.realtime:
                    if t_wall0 is None:
                        t_wall0, t_src0 = time.monotonic(), frame.time_s
                    wait = (frame.time_s - t_src0) - (time.monotonic() - t_wall0)
                    if wait > 0 and self._stop.wait(wait):
                        break
                self.buffer.put(frame)
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer by take()
            error = e
        finally:
            self._container.close()
            self.buffer.close(error)

    def take(self, timeout: float | None = None) -> tuple[Frame, int] | None:
        return self.buffer.take(timeout)

    def __iter__(self) -> Iterator[tuple[Frame, int]]:
        while (got := self.take()) is not None:
            yield got

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)

    def __enter__(self) -> "LiveFrames":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
