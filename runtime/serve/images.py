"""``image_url`` values -> image bytes: base64 ``data:`` URIs, or local files under --image-root.

URLs are never fetched. Decoding (and the decompression-bomb pixel limit) is the runtime's
``load_image``; this module only finds the bytes and enforces --max-image-mb and the root.
"""
from __future__ import annotations

import base64
import binascii
from pathlib import Path
from urllib.parse import unquote, urlparse

from .errors import ForbiddenPath, ImageTooLarge, RequestError

PARAM = "messages"


def image_bytes(url: str, max_bytes: int, image_root: Path | None) -> bytes:
    """The bytes behind an ``image_url.url``."""
    if url.startswith("data:"):
        return _data_uri(url, max_bytes)
    if url.startswith(("http://", "https://")):
        raise RequestError("image URLs are not fetched; send the image as a base64 data: URI "
                           "(or a path under the server's --image-root)", PARAM, "url_not_supported")
    return _local_file(url, max_bytes, image_root)


def _too_large(n: int, max_bytes: int) -> ImageTooLarge:
    return ImageTooLarge(f"image is {n / 2**20:.1f} MB, over the server's limit of {max_bytes / 2**20:.1f} MB "
                         "(--max-image-mb)", PARAM, "image_too_large")


def _data_uri(url: str, max_bytes: int) -> bytes:
    head, sep, payload = url.partition(",")
    media = head[len("data:"):].split(";")
    if not sep or "base64" not in media[1:]:
        raise RequestError("image data: URIs must be base64 (data:image/png;base64,...)", PARAM, "invalid_image")
    if media[0] and not media[0].startswith("image/"):
        raise RequestError(f"data: URI of type {media[0]!r} is not an image", PARAM, "invalid_image")
    if len(payload) * 3 // 4 > max_bytes:
        raise _too_large(len(payload) * 3 // 4, max_bytes)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("image data: URI is not valid base64 (truncated?)", PARAM, "invalid_image") from None


def _local_file(url: str, max_bytes: int, image_root: Path | None) -> bytes:
    path = Path(unquote(urlparse(url).path)) if url.startswith("file://") else Path(url)
    if image_root is None:
        raise ForbiddenPath("local image paths are disabled; start the server with --image-root DIR "
                            "or send a base64 data: URI", PARAM, "path_forbidden")
    root = image_root.resolve()
    real = (root / path).resolve()  # an absolute path replaces root; symlinks are followed
    if not real.is_relative_to(root):
        raise ForbiddenPath(f"{url}: outside the server's --image-root", PARAM, "path_forbidden")
    if not real.is_file():
        raise RequestError(f"{url}: no such image file under --image-root", PARAM, "invalid_image")
    if real.stat().st_size > max_bytes:
        raise _too_large(real.stat().st_size, max_bytes)
    return real.read_bytes()
