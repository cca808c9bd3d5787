"""The ASGI app: routes over one Runtime, a Worker that runs one generation at a time, Metrics.

    app = create_app(runtime, ServeConfig(model_name="tiny"))   # then uvicorn.run(app, ...)
"""
from __future__ import annotations

import asyncio
import hmac
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..errors import EdgeVLMError
from . import responses as fmt
from .errors import AuthError, ClientGone, error_body, to_http, validation_error
from .limits import BodyLimits
from .metrics import CONTENT_TYPE, Metrics
from .requests import ChatJob, Limits, check_model, prepare_chat
from .schema import SSE_DOC, ChatCompletion, ChatRequest, ErrorBody, Health, ModelList
from .ui import mount_ui
from .worker import DONE, ERROR, PIECE, Job, Worker

PATHS = ("/v1/chat/completions", "/v1/models", "/health", "/metrics")
DISCONNECT_POLL_S = 0.25


@dataclass
class ServeConfig:
    model_name: str
    api_key: str | None = None
    max_queue: int = 16  # requests that may wait behind the running one; more -> 429
    strict_model: bool = False  # True: a request naming another model gets 404 (default: served anyway)
    max_body_bytes: int = 100 << 20  # larger request bodies get 413 (limits.BodyLimits)
    body_timeout_s: float = 30.0  # a body not received this long after the request started: 408
    limits: Limits = field(default_factory=Limits)
    ui: bool = True  # the browser playground at / (ui.py; --no-ui: off)


class Server:
    """What the routes share: the runtime, its worker and the metrics."""

    def __init__(self, rt, config: ServeConfig):
        self.rt, self.config = rt, config
        self.worker = Worker(config.max_queue)
        self.metrics = Metrics()
        self.metrics.watch(self.worker, rt.caches)

    def authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {key}".encode()):
            raise AuthError("invalid or missing API key (Authorization: Bearer KEY)", None, "invalid_api_key")

    def submit(self, spec: ChatJob) -> Job:
        job = Job(lambda: self.rt.stream_ids(spec.prompt_ids, spec.pixels, spec.config),
                  asyncio.get_running_loop(), self.metrics.observe, spec.logprobs)
        self.worker.submit(job)
        if spec.config.constraint is not None:
            self.metrics.constrained.inc()
        return job

    async def next_event(self, job: Job, request: Request) -> tuple[str, object]:
        """The job's next event; cancels the job if the client has gone meanwhile."""
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()

    async def result(self, job: Job, request: Request):
        while True:
            kind, value = await self.next_event(job, request)
            if kind == DONE:
                return value
            if kind == ERROR:
                raise _user_error(value)

    async def sse(self, job: Job, first: tuple[str, object], rid: str, spec: ChatJob):
        model = self.config.model_name
        try:
            yield fmt.chunk(rid, model, {"role": "assistant", "content": ""})
            kind, value = first
            while kind == PIECE:
                text, lp = value
                yield fmt.chunk(rid, model, {"content": text}, lp=lp)
                kind, value = await job.events.get()
            if kind == DONE:
                yield fmt.chunk(rid, model, {}, fmt.FINISH[value.finish_reason], timings=fmt.timings(value))
                if spec.include_usage:
                    yield fmt.usage_chunk(rid, model, value)
            else:  # an error after the response started: an error event, then the end of the stream
                _, body, _ = _error_reply(value)
                yield fmt.sse(body)
            yield fmt.DONE
        finally:
            job.cancel()  # a no-op once finished; stops the generation when the client has left


def _user_error(exc: BaseException) -> BaseException:
    return ClientGone("the client left before the request ran") if isinstance(exc, asyncio.CancelledError) else exc


def _error_reply(exc: BaseException) -> tuple[int, dict, dict]:
    exc = _user_error(exc)
    if isinstance(exc, EdgeVLMError):
        return to_http(exc)
    return 500, error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), {}


def create_app(rt, config: ServeConfig) -> FastAPI:
    server = Server(rt, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await run_in_threadpool(server.worker.close)  # cancel in-flight work, join the thread

    app = FastAPI(title="edgevlm", summary="An OpenAI-compatible chat API over one edgevlm Runtime.",
                  lifespan=lifespan)
    app.state.server = server
    app.add_middleware(BodyLimits, max_bytes=config.max_body_bytes, timeout_s=config.body_timeout_s)
    app.add_middleware(CountRequests, metrics=server.metrics)  # outermost: counts the 408/413s too

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception):
        status, body, headers = _error_reply(exc)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError):
        status, body, headers = validation_error(list(exc.errors()))
        return JSONResponse(body, status_code=status, headers=headers)

    app.add_exception_handler(EdgeVLMError, on_error)
    _routes(app, server)
    if config.ui:
        mount_ui(app, server)
    return app


ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 403, 404, 413, 429)}


def _routes(app: FastAPI, server: Server) -> None:
    rt, config = server.rt, server.config
    auth = [Depends(server.authorize)]

    @app.post("/v1/chat/completions", response_model=ChatCompletion, dependencies=auth,
              responses={**ERRORS, 200: SSE_DOC})
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body.model, config.model_name, config.strict_model)
        spec = await run_in_threadpool(prepare_chat, body, rt, config.limits)
        job = server.submit(spec)
        rid = fmt.new_id()
        if not spec.stream:
            return fmt.completion(rid, config.model_name, await server.result(job, request), spec.logprobs)
        first = await server.next_event(job, request)  # errors before the first token are 4xx/500
        if first[0] == ERROR:
            raise _user_error(first[1])
        return StreamingResponse(server.sse(job, first, rid, spec), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.get("/v1/models", response_model=ModelList, dependencies=auth, responses={401: {"model": ErrorBody}})
    async def models():
        return {"data": [{"id": config.model_name}]}

    @app.get("/health", response_model=Health)
    async def health():
        return {"model": config.model_name, "backend": rt.backend.name, "queue_depth": server.worker.queue_depth}

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)


class CountRequests:
    """ASGI middleware: count every HTTP response by path and status."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in PATHS else "other"

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.count_request(path, message["status"])
            await send(message)

        await self.app(scope, receive, counted)
