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


def validation_error(errors: list[dict]) -> tuple[int, dict, dict]:
    """FastAPI's RequestValidationError.errors() -> a 400 naming the first bad field, OpenAI's way."""
    from .schema import NOT_SUPPORTED, REFUSED

    e = _deepest(errors) if errors else {"loc": (), "msg": "invalid request", "type": "invalid"}
    loc = [part for part in e.get("loc", ()) if part != "body"]
    param = loc[0] if loc and loc[0] in REFUSED else _param(loc)
    kind = e.get("type", "")
    if kind == "json_invalid":
        return 400, error_body(f"the request body is not valid JSON ({e.get('msg')})", "invalid_request_error",
                               None, "invalid_json"), {}
    if not loc:
        message = f"the request body must be a JSON object with messages ({e.get('msg')})"
    elif loc[0] in REFUSED:
        message = f"{loc[0]} is {NOT_SUPPORTED} (got {_short(e.get('input'))}); leave it out"
    elif kind == "extra_forbidden":
        message = f"unknown field {param}: {NOT_SUPPORTED}"
    elif kind == "missing":
        message = f"{param} is required"
    else:
        message = f"{param}: {e.get('msg')} (got {_short(e.get('input'))})"
    return 400, error_body(message, "invalid_request_error", param, "unsupported_parameter"
                           if loc and (loc[0] in REFUSED or kind == "extra_forbidden") else "invalid_value"), {}


def _deepest(errors: list[dict]) -> dict:
    """Of the errors about the first bad field, the one deepest in (a union's branches each report
    one; the deepest names the part that is wrong)."""
    top = [e for e in errors if e.get("loc", ())[:2] == errors[0].get("loc", ())[:2]]
    return max(reversed(top), key=lambda e: len(e.get("loc", ())))  # ties: the last branch (a list)


def _param(loc: list) -> str | None:
    """("messages", 0, "content", "list[...]", 0, "image_url", "image_url", "ImageURL", "url") ->
    "messages[0].content[0].image_url.url": pydantic's union branch and tag labels are dropped."""
    out, last = "", None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).isidentifier() or str(part)[:1].isupper() or part in ("str", "int", "float", "bool") \
                or part == last:
            continue
        else:
            out += f".{part}" if out else str(part)
        last = part
    return out or None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
