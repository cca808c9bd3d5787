"""Errors a client can cause, and the one place that turns any EdgeVLMError into an HTTP status
and OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``."""
from __future__ import annotations

from ..errors import ContextLengthError, EdgeVLMError, ImageError


class RequestError(EdgeVLMError):
    """A malformed or unsupported request (400); ``param`` names the offending field."""

    status = 400
    kind = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class ImageTooLarge(RequestError):
    status = 413


class AuthError(RequestError):
    status = 401
    kind = "authentication_error"


class ForbiddenPath(RequestError):
    status = 403
    kind = "permission_error"


class ModelNotFound(RequestError):
    status = 404


class QueueFull(RequestError):
    status = 429
    kind = "rate_limit_error"
    retry_after_s = 1


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def to_http(exc: EdgeVLMError) -> tuple[int, dict, dict]:
    """(status, JSON body, extra headers) for a user error."""
    if isinstance(exc, RequestError):
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, QueueFull) else {}
        return exc.status, error_body(str(exc), exc.kind, exc.param, exc.code), headers
    if isinstance(exc, ContextLengthError):
        return 400, error_body(str(exc), "invalid_request_error", "messages", "context_length_exceeded"), {}
    if isinstance(exc, ImageError):
        return 400, error_body(str(exc), "invalid_request_error", "messages", "invalid_image"), {}
    return 400, error_body(str(exc), "invalid_request_error"), {}


class ClientGone(RequestError):
    """The client left before its request ran (nginx's 499; nobody reads the reply)."""

    status = 499
