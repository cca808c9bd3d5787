"""``video_url`` content parts: a video (base64 ``data:`` URI, or a path under --image-root; URLs are
never fetched) sampled to K frames, which the prompt takes as K images in a row.

The part has the shape llama.cpp's and vLLM's servers take::

    {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}}

Sampling: the video's frames are counted from its packets (no decoding), then K frames evenly spaced
from the first to the last are decoded (``np.linspace(0, n - 1, K)`` rounded), in one pass. A video
that is not a video, truncated, has no frames, a codec FFmpeg cannot decode, more than
--max-video-frames frames or more than --max-video-mb bytes is a 4xx naming the problem.
Bounds per request: the encoded bytes (--max-video-mb), the frames demuxed (--max-video-frames), and
K decoded frames held at once.
"""
from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

from .errors import ForbiddenPath, ImageTooLarge, RequestError
from .images import image_bytes

PARAM = "messages"
CODE = "invalid_video"
DEFAULT_VIDEO_FRAMES = 4
DEFAULT_MAX_VIDEO_FRAMES = 18_000  # 10 minutes at 30 fps
TEXT_RESERVE = 128  # context positions kept for the conversation's text when counting images that fit


@dataclass(frozen=True)
class VideoFrameRef:
    """Frame ``i`` of the ``k`` sampled from the video at ``url`` (one image position in the prompt)."""

    url: str
    i: int
    k: int


def images_that_fit(n_ctx: int, n_visual: int) -> int:
    """Images a conversation may hold: as many as the context takes with ``TEXT_RESERVE`` positions
    left for text (at least 1: a longer prompt is refused by the context check, naming both numbers)."""
    return max(1, (n_ctx - TEXT_RESERVE) // max(n_visual, 1))


def video_refs(url: str, k: int) -> list[VideoFrameRef]:
    return [VideoFrameRef(url, i, k) for i in range(k)]


def _too_large(n: int, max_bytes: int) -> ImageTooLarge:
    return ImageTooLarge(f"video is {n / 2**20:.1f} MB, over the server's limit of {max_bytes / 2**20:.1f} MB "
                         "(--max-video-mb)", PARAM, "video_too_large")


def video_bytes(url: str, max_bytes: int, image_root: Path | None) -> bytes:
    """The bytes behind a ``video_url.url``: a base64 data: URI or a file under ``image_root``."""
    if url.startswith("data:"):
        head, sep, payload = url.partition(",")
        media = head[len("data:"):].split(";")
        if not sep or "base64" not in media[1:]:
            raise RequestError("video data: URIs must be base64 (data:video/mp4;base64,...)", PARAM, CODE)
        if media[0] and not media[0].startswith(("video/", "application/octet-stream")):
            raise RequestError(f"data: URI of type {media[0]!r} is not a video", PARAM, CODE)
        if len(payload) * 3 // 4 > max_bytes:
            raise _too_large(len(payload) * 3 // 4, max_bytes)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError("video data: URI is not valid base64 (truncated?)", PARAM, CODE) from None
    if url.startswith(("http://", "https://", "rtsp://")):
        raise RequestError("video URLs are not fetched; send the video as a base64 data: URI "
                           "(or a path under the server's --image-root)", PARAM, "url_not_supported")
    if image_root is None:
        raise ForbiddenPath("local video paths are disabled; start the server with --image-root DIR "
                            "or send a base64 data: URI", PARAM, "path_forbidden")
    path = Path(unquote(urlparse(url).path)) if url.startswith("file://") else Path(url)
    root = image_root.resolve()
    real = (root / path).resolve()
    if not real.is_relative_to(root):
        raise ForbiddenPath(f"{url}: outside the server's --image-root", PARAM, "path_forbidden")
    if not real.is_file():
        raise RequestError(f"{url}: no such video file under --image-root", PARAM, CODE)
    if real.stat().st_size > max_bytes:
        raise _too_large(real.stat().st_size, max_bytes)
    return real.read_bytes()


def _av():
    try:
        import av
    except ImportError:
        raise RequestError("this server cannot read video: PyAV is not installed (pip install 'edgevlm[video]')",
                           PARAM, "video_not_supported") from None
    return av


def _bad(what: str, e: BaseException | None = None) -> RequestError:
    reason = f" ({getattr(e, 'strerror', None) or e})" if e is not None else ""
    return RequestError(f"video_url: {what}{reason}", PARAM, CODE)


def _count_packets(container) -> tuple[int, float]:
    """(video packets holding data, end time of the last one in seconds) from demuxing alone."""
    stream = container.streams.video[0]
    n, end = 0, 0.0
    for pkt in container.demux(stream):
        if pkt.size:
            n += 1
            if pkt.pts is not None and pkt.time_base is not None:
                end = max(end, float((pkt.pts + (pkt.duration or 0)) * pkt.time_base))
    return n, end


def _truncated(container, n: int, end_s: float) -> str | None:
    """Why the video looks cut short (fewer frames or less time than its header says), or None."""
    stream = container.streams.video[0]
    if stream.frames and n < stream.frames:
        return f"{n} of the {stream.frames} frames its header lists"
    header_s = container.duration / 1e6 if container.duration else 0.0
    if n and header_s and end_s < 0.9 * header_s:
        return f"its frames end at {end_s:.2f} s of the {header_s:.2f} s its header gives"
    return None


def sample_frames(data: bytes, k: int, max_frames: int) -> list:
    """``k`` frames (PIL images) evenly spaced over the video in ``data``; RequestError if it is not a
    decodable video with 1..``max_frames`` frames."""
    av = _av()
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise _bad("the file has no video stream")
            n, end_s = _count_packets(container)
            truncated = _truncated(container, n, end_s)
    except av.FFmpegError as e:
        raise _bad("not a readable video", e) from None
    if n == 0:
        raise _bad("the video has no frames")
    if truncated:
        raise _bad(f"truncated: {truncated}")
    if n > max_frames:
        raise RequestError(f"video_url: the video has {n} frames, over the server's limit of {max_frames} "
                           "(--max-video-frames)", PARAM, "video_too_long")
    targets = [int(round(x)) for x in np.linspace(0, n - 1, k)]
    wanted = set(targets)
    got: dict[int, object] = {}
    index = 0
    try:
        with av.open(io.BytesIO(data)) as container:
            for frame in container.decode(container.streams.video[0]):
                if index in wanted:
                    got[index] = frame.to_image()  # RGB PIL
                index += 1
                if len(got) == len(wanted):
                    break
    except av.FFmpegError as e:
        raise _bad(f"decoding failed after {index} frame(s): truncated or a codec this server cannot decode", e) \
            from None
    if len(got) < len(wanted):
        raise _bad(f"only {index} of its {n} frames could be decoded (truncated?)")
    return [got[t] for t in targets]


def media_pixels(media: list, rt, limits) -> np.ndarray:
    """Pixel values [B, 3, S, S] for a conversation's images in prompt order: ``image_url`` values
    (str) and ``VideoFrameRef``s (each video decoded once)."""
    videos: dict[str, list] = {}
    out = []
    for m in media:
        if isinstance(m, VideoFrameRef):
            if m.url not in videos:
                raw = video_bytes(m.url, limits.max_video_bytes, limits.image_root)
                videos[m.url] = sample_frames(raw, m.k, limits.max_video_frames)
            image = videos[m.url][m.i]
        else:
            image = image_bytes(m, limits.max_image_bytes, limits.image_root)
        out.append(rt.pixel_values(image, limits.max_pixels))
    return np.concatenate(out)  # [B, 3, S, S]
