"""Errors as HTTP answers: every failure comes back in OpenAI's error shape with its status."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import ValidationError

from stream2llm.errors import (
    AdmissionRejected,
    ContextTooLong,
    EngineDied,
    InvalidEvent,
    OutputTooLong,
    SequenceError,
    SessionClosed,
    SessionExpired,
    StreamError,
    UnknownSession,
)


class ApiError(Exception):
    """An error with its HTTP status, rendered in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.close = close  # end the connection after answering (a half-read body, a refused one)

    def response(self) -> web.Response:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        response = web.json_response(self.body(), status=self.status, headers=headers)
        if self.close:
            response.force_close()
        return response

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# Most specific first: SessionExpired is a SessionClosed, everything is a StreamError.
_ERROR_MAP: list[tuple[type[StreamError], int, str, str]] = [
    (EngineDied, 503, "server_error", "engine_dead"),
    (UnknownSession, 404, "not_found_error", "session_not_found"),
    (SessionExpired, 410, "invalid_request_error", "session_expired"),
    (SessionClosed, 409, "invalid_request_error", "session_closed"),
    (SequenceError, 409, "invalid_request_error", "sequence_error"),
    (ContextTooLong, 400, "invalid_request_error", "context_length_exceeded"),
    (OutputTooLong, 400, "invalid_request_error", "context_length_exceeded"),
    (AdmissionRejected, 429, "rate_limit_error", "too_many_sessions"),
    (InvalidEvent, 400, "invalid_request_error", "invalid_event"),
    (StreamError, 400, "invalid_request_error", "invalid_request"),
]


def api_error(exc: StreamError) -> ApiError:
    """The HTTP form of one of the project's errors."""
    for cls, status, type_, code in _ERROR_MAP:
        if isinstance(exc, cls):
            return ApiError(status, str(exc), type=type_, code=code)
    raise AssertionError("unreachable: StreamError is mapped")


def validation_error(exc: ValidationError) -> ApiError:
    """A 400 naming every field pydantic rejected (the first one as ``param``)."""
    problems, first = [], None
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "body"
        first = first or where
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown field {where!r}")
        else:
            problems.append(f"{where}: {err['msg']}")
    return ApiError(400, "invalid request: " + "; ".join(problems), code="invalid_value", param=first)


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body exceeds {limit} bytes", code="request_too_large")


def body_timeout(limit_s: float) -> ApiError:
    return ApiError(
        408, f"request body not received within {limit_s:g} s", code="request_timeout", close=True
    )


def unsupported_media_type(given: str | None) -> ApiError:
    return ApiError(
        415,
        f"Content-Type must be application/json, got {given!r}",
        code="unsupported_media_type",
    )
