"""Serve a bundle over HTTP with an OpenAI-compatible API (chat completions with images, streaming).

Example:
    edgevlm serve --bundle bundles/tiny-gguf --port 8080
    curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "tiny-gguf", "messages": [{"role": "user", "content": "Hello"}]}'

Endpoints: POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics (Prometheus),
GET /openapi.json (the API as data) and /docs. Any model name is served unless --strict-model.
Requests run one at a time, in order; --max-queue more may wait, the rest get 429. Images come as
base64 data: URIs, or as paths under --image-root; URLs are never fetched. Needs the [serve] extra.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..cli_run import add_runtime_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="bundle dir (manifest.json), or a model dir or preset (torch)")
    add_runtime_arguments(p)  # --backend (default: the bundle's own), --threads, --max-context, ...
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--model-name", default=None, help="the model id the server reports (default: the bundle dir's name)")
    p.add_argument("--strict-model", action="store_true",
                   help="refuse (404) requests naming another model (default: serve them, like llama-server)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--max-queue", type=int, default=16, help="requests that may wait behind the running one")
    p.add_argument("--max-image-mb", type=float, default=20.0, help="largest encoded image accepted")
    p.add_argument("--max-pixels", type=int, default=None, help="largest decoded image (decompression-bomb guard)")
    p.add_argument("--max-images", type=int, default=None,
                   help="images per conversation, video frames included (default: as many as the model's context "
                        "takes, 128 positions kept for text)")
    p.add_argument("--video-frames", type=int, default=4, help="frames a video_url part is sampled to")
    p.add_argument("--max-video-mb", type=float, default=64.0, help="largest encoded video accepted")
    p.add_argument("--max-video-frames", type=int, default=18000, help="longest video accepted, in frames")
    p.add_argument("--max-body-mb", type=float, default=100.0, help="largest request body accepted (413 above)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a client may take to send its request body (408 after; slow clients)")
    p.add_argument("--image-root", type=Path, default=None, help="allow image paths under this directory")
    p.add_argument("--max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    p.add_argument("--max-tokens-limit", type=int, default=None,
                   help="refuse (400) requests asking for more tokens (default: only the context bounds them)")
    p.add_argument("--image-cache-mb", type=float, default=64.0, help="image-embedding cache size (0: off)")
    p.add_argument("--no-prefix-reuse", action="store_true", help="always prefill the whole prompt")
    p.add_argument("--no-ui", action="store_true", help="no browser playground at / (docs/playground.md)")


def build(args: argparse.Namespace):
    """(ASGI app, runtime) for the parsed arguments."""
    from ..cli_run import runtime_options
    from ..engine import Runtime
    from ..errors import EdgeVLMError
    from ..preprocess import DEFAULT_MAX_PIXELS
    from .app import ServeConfig, create_app
    from .requests import Limits
    from .video import images_that_fit

    if args.max_body_mb <= 0 or args.body_timeout <= 0:
        raise EdgeVLMError("--max-body-mb and --body-timeout must be > 0")
    if args.max_queue < 0 or args.max_image_mb <= 0 or (args.max_images or 0) < 0:
        raise EdgeVLMError("--max-queue must be >= 0, --max-image-mb > 0 and --max-images >= 0")
    if args.video_frames < 1 or args.max_video_mb <= 0 or args.max_video_frames < 1:
        raise EdgeVLMError("--video-frames, --max-video-mb and --max-video-frames must be > 0")
    if args.image_root is not None and not args.image_root.is_dir():
        raise EdgeVLMError(f"--image-root {args.image_root}: not a directory")
    rt = Runtime.load(args.bundle, backend=args.backend, image_cache_mb=args.image_cache_mb,
                      prefix_reuse=not args.no_prefix_reuse, **runtime_options(args))
    fit = images_that_fit(rt.backend.n_ctx, rt.manifest.model.n_visual_tokens)
    limits = Limits(max_image_bytes=int(args.max_image_mb * (1 << 20)),
                    max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
                    max_images=fit if args.max_images is None else args.max_images,
                    image_root=args.image_root, default_max_tokens=args.max_tokens,
                    max_tokens_limit=args.max_tokens_limit, video_frames=args.video_frames,
                    max_video_bytes=int(args.max_video_mb * (1 << 20)), max_video_frames=args.max_video_frames)
    config = ServeConfig(model_name=args.model_name or Path(args.bundle).resolve().name,
                         api_key=args.api_key, max_queue=args.max_queue, limits=limits, ui=not args.no_ui,
                         strict_model=args.strict_model, max_body_bytes=int(args.max_body_mb * (1 << 20)),
                         body_timeout_s=args.body_timeout)
    return create_app(rt, config), rt


def run(args: argparse.Namespace) -> int:
    from ..errors import EdgeVLMError

    try:
        import uvicorn
    except ImportError:
        raise EdgeVLMError("edgevlm serve needs FastAPI and uvicorn: pip install 'edgevlm[serve]'") from None
    app, rt = build(args)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=10)
    finally:
        rt.close()
    return 0


if __name__ == "__main__":
    from edgevlm.cli import script_main

    script_main("serve")
