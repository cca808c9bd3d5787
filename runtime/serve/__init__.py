"""``edgevlm serve``: an OpenAI-compatible HTTP server over one ``Runtime`` (FastAPI + uvicorn).

The server owns HTTP, request parsing, queueing and limits; generation, images, templates and
caches are the runtime's. Modules: ``schema`` (request/response bodies as pydantic models: the
OpenAPI document), ``errors`` (user errors -> OpenAI-shaped 4xx, in one place), ``requests``
(validated request -> prompt ids, pixels, GenerationConfig with constraint), ``images`` (image_url ->
bytes: data URIs and paths under --image-root), ``worker`` (one generation at a time, in order,
bounded queue), ``metrics`` (prometheus_client), ``responses`` (OpenAI response and chunk shapes),
``app`` (the routes), ``cli`` (the subcommand), ``background`` (uvicorn in a thread, for tests and
benchmarks).
"""
from __future__ import annotations

__all__ = ["ServeConfig", "create_app"]


def __getattr__(name: str):
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
