"""The gateway's error model and the one place it becomes the JSON envelope.

Every non-2xx JSON body is ``{"error": {"code", "message", "status", "request_id", ...}}``.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from storage import db

logger = logging.getLogger("gateway.edge.errors")

# Seconds a client is told to wait when a store is down.
OUTAGE_RETRY_AFTER_S = 1


class GatewayError(Exception):
    """An error a client is told about: a stable ``code``, an HTTP ``status`` and a message."""

    code = "internal_error"
    status = 500
    message = "Internal server error"

    def __init__(
        self,
        message: str | None = None,
        *,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.message = message or self.message
        self.details = details
        self.headers = headers or {}
        super().__init__(self.message)


class Unauthorized(GatewayError):
    code, status, message = "unauthorized", 401, "Missing or invalid bearer token"


class Forbidden(GatewayError):
    code, status, message = "forbidden", 403, "Not allowed"


class NotFound(GatewayError):
    code, status, message = "not_found", 404, "Not found"


class ChatNotFound(GatewayError):
    code, status, message = "chat_not_found", 404, "Chat not found"


class ModelNotFound(GatewayError):
    code, status, message = "model_not_found", 404, "No provider serves this model"


class ValidationFailed(GatewayError):
    code, status, message = "validation_error", 422, "The request is not valid"


class PayloadTooLarge(GatewayError):
    code, status, message = "payload_too_large", 413, "The request body is too large"


class ChatLimitReached(GatewayError):
    code, status, message = "chat_limit_reached", 403, "The limit of active chats is reached"


class StreamAlreadyActive(GatewayError):
    code, status, message = "stream_already_active", 409, "A reply is already streaming in this chat"


class DuplicateMessage(GatewayError):
    code, status, message = "duplicate_message", 409, "The chat already holds a message with this client_message_id"


class InvalidEventId(GatewayError):
    code, status, message = "invalid_event_id", 400, "The event id is not one of this turn's"


class TooManyReaders(GatewayError):
    code, status, message = "too_many_readers", 429, "This reply has as many readers as it may have"


class Unavailable(GatewayError):
    """A store is down: the client is told when to try again (``Retry-After``)."""

    code, status, message = "unavailable", 503, "A backing service is unavailable"

    def __init__(self, message: str | None = None, *, details: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, details=details, headers={"Retry-After": str(OUTAGE_RETRY_AFTER_S), **(headers or {})})


class UpstreamError(GatewayError):
    code, status, message = "upstream_error", 502, "The model provider failed"


class UpstreamTimeout(GatewayError):
    code, status, message = "upstream_timeout", 504, "The model provider timed out"


def error_body(request_id: str, code: str, status: int, message: str, details: Any = None) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message, "status": status, "request_id": request_id}
    if details is not None:
        error["details"] = details
    return orjson.dumps({"error": error})


# Paths of the OpenAI-compatible surface: their errors take OpenAI's shape, so its SDKs parse them.
OPENAI_PATHS = frozenset({"/v1/chat/completions", "/v1/models"})
_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
                 422: "invalid_request_error", 429: "rate_limit_error"}


def openai_error_body(request_id: str, error: GatewayError) -> bytes:
    param = None
    if isinstance(error.details, list) and error.details and isinstance(error.details[0], dict):
        loc = error.details[0].get("loc")
        param = ".".join(str(part) for part in loc) if loc else None
    message = error.message
    if error.details and error.code == "validation_error":
        message = f"{message}: " + "; ".join(
            f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}" for d in error.details)
    kind = _OPENAI_TYPES.get(error.status, "api_error" if error.status >= 500 else "invalid_request_error")
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": error.code,
                                   "request_id": request_id}})


def request_id_of(request: Request) -> str:
    return str(getattr(request.state, "request_id", ""))


def envelope(request: Request, error: GatewayError) -> Response:
    rid = request_id_of(request)
    headers = {"X-Request-ID": rid, **error.headers}
    if request.scope["path"] in OPENAI_PATHS:
        body = openai_error_body(rid, error)
    else:
        body = error_body(rid, error.code, error.status, error.message, error.details)
    return Response(body, status_code=error.status, headers=headers, media_type="application/json")


async def handle_gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return envelope(request, exc)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error = GatewayError(str(exc.detail), headers=dict(exc.headers or {}))
    error.code = _HTTP_CODES.get(exc.status_code, "http_error")
    error.status = exc.status_code
    return envelope(request, error)


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error", extra={"request_id": request_id_of(request)})
    return envelope(request, GatewayError())


async def handle_outage(request: Request, exc: Exception) -> Response:
    """PostgreSQL or Redis unreachable: 503 ``unavailable`` with ``Retry-After``, on every route."""
    logger.warning("a store is unavailable", extra={"error": type(exc).__name__,
                                                   "request_id": request_id_of(request)})
    return envelope(request, Unavailable())


EXCEPTION_HANDLERS: dict[Any, Any] = {
    GatewayError: handle_gateway_error,
    HTTPException: handle_http_exception,
    **{outage: handle_outage for outage in (*db.OUTAGES, RedisConnectionError, RedisTimeoutError)},
    Exception: handle_unexpected,
}
