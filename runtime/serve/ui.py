"""The browser playground at ``/``: three static files (static/index.html, app.js, style.css) that
talk to the server's own OpenAI-compatible endpoints, so the page is also an example client.

``edgevlm serve --no-ui`` leaves it out (``/`` is then a 404). With ``--api-key`` the page is behind
the key like the API: ``Authorization: Bearer KEY`` opens it (curl), and a browser signs in once with
a form (``POST /login``), which sets a same-site cookie holding the key; app.js sends that key as the
API's Bearer header (it needs it for every /v1 call anyway).
"""
from __future__ import annotations

import hmac
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

STATIC = Path(__file__).with_name("static")
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
COOKIE = "edgevlm_key"
# Everything from this origin, nothing from elsewhere (the device has no internet anyway); images
# and the camera come as data: and blob: URLs.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
LOGIN = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>edgevlm: sign in</title></head>
<body><main>
<h1>edgevlm playground</h1>
<p>This server was started with <code>--api-key</code>. Enter that key to open the playground.</p>
{message}
<form method="post" action="/login">
<label for="key">API key</label>
<input id="key" name="key" type="password" autocomplete="current-password" required autofocus>
<button type="submit">Sign in</button>
</form>
</main></body></html>
"""


def mount_ui(app: FastAPI, server) -> None:
    """Add the playground's routes to ``app`` (``server``: the app's Server, for its API key)."""
    key = server.config.api_key
    files = {name: (STATIC / name).read_bytes() for name in ("index.html", *ASSETS)}

    def allowed(request: Request) -> bool:
        if key is None:
            return True
        bearer = request.headers.get("authorization", "")
        cookie = unquote(request.cookies.get(COOKIE, ""))
        return _same(bearer, f"Bearer {key}") or _same(cookie, key)

    @app.get("/", include_in_schema=False)
    async def index(request: Request):
        if not allowed(request):
            return _login(None)
        return Response(files["index.html"], media_type="text/html; charset=utf-8", headers=HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def asset(name: str, request: Request):
        if name not in ASSETS:
            return Response("not found", status_code=404, media_type="text/plain")
        if not allowed(request):
            return Response("sign in at / first", status_code=401, media_type="text/plain")
        return Response(files[name], media_type=ASSETS[name], headers=HEADERS)

    @app.post("/login", include_in_schema=False)
    async def login(request: Request):
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        given = (form.get("key") or [""])[0]
        if key is None:
            return RedirectResponse("/", status_code=303)
        if not _same(given, key):
            return _login("That is not this server's API key.")
        reply = RedirectResponse("/", status_code=303)
        # read by app.js (it sends the key as the Bearer header), sent back to this server only
        reply.set_cookie(COOKIE, quote(key, safe=""), path="/", samesite="strict", httponly=False,
                         secure=request.url.scheme == "https")
        return reply


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _login(message: str | None) -> HTMLResponse:
    note = f'<p role="alert" id="login-error">{message}</p>' if message else ""
    return HTMLResponse(LOGIN.format(message=note), status_code=401, headers=HEADERS)
