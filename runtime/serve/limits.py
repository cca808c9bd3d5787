"""HTTP-level limits uvicorn does not set: the largest request body and how long a client may take to
send it (a slowloris client trickling a body would otherwise hold its connection open for ever).

``BodyLimits`` is ASGI middleware: it reads the whole body of each HTTP request before the app runs,
answering 413 when it is (or says it is) larger than ``max_bytes`` and 408 when it has not arrived
``timeout_s`` after the request started; then it replays the body to the app, whose later
``receive()`` calls (the disconnect checks while a stream runs) go to the client as usual.
"""
from __future__ import annotations

import asyncio
import json

from .errors import error_body


class BodyLimits:
    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await _reply(send, 413, self._too_large(int(length)))
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout_s)
        except asyncio.TimeoutError:
            return await _reply(send, 408, error_body(
                f"the request body did not arrive within {self.timeout_s:g} s (--body-timeout)",
                "invalid_request_error", None, "request_timeout"))
        except _TooLarge as e:
            return await _reply(send, 413, self._too_large(e.n))
        except _Gone:
            return None  # the client left while sending: nobody to answer
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive) -> bytes:
        chunks, n = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Gone()
            chunk = message.get("body", b"")
            n += len(chunk)
            if n > self.max_bytes:
                raise _TooLarge(n)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self, n: int) -> dict:
        return error_body(f"the request body is over this server's limit of {self.max_bytes / 2**20:.1f} MB "
                          f"({n / 2**20:.1f} MB or more; --max-body-mb)", "invalid_request_error", None,
                          "request_too_large")


class _TooLarge(Exception):
    def __init__(self, n: int):
        self.n = n


class _Gone(Exception):
    pass


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _reply(send, status: int, body: dict) -> None:
    raw = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": raw})
