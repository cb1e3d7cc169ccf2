"""Request id and the access log, as one pure ASGI middleware (it sees streaming bodies and disconnects)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

access_log = logging.getLogger("gateway.access")

_HEADER = b"x-request-id"
_MAX_ID = 128
# Where a streaming response finds the server's send, beneath the middleware stack (set by the app,
# gateway/app.py). The wrappers between (ours, Starlette's error and exception handling) only look at a
# response's start; a stream sends its body frames, one per provider read, below them.
BODY_SEND = "gateway.body_send"
# The rest of a response that goes on after the app has returned: a stream leaves it here, and the
# server-facing app (gateway/app.py) runs it once the middleware stack has unwound, so that the stack's
# frames (a dozen suspended coroutines of Starlette's layers and ours) do not live as long as the stream.
# A middleware that acts at a response's end wraps it (``then``).
RESPONSE_REST = "gateway.response_rest"
ResponseRest = Callable[[Receive], Awaitable[None]]


def then(rest: ResponseRest, after: Callable[[], None]) -> ResponseRest:
    async def run(receive: Receive) -> None:
        try:
            await rest(receive)
        finally:
            after()

    return run


class RequestContextMiddleware:
    """Echoes or assigns ``X-Request-ID`` and writes one log line per request when its response ends."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_id(scope) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.setdefault("headers", [])
                if not any(name == _HEADER for name, _ in headers):
                    headers.append((_HEADER, request_id.encode()))
            await send(message)

        def log() -> None:
            principal = scope.get("user")
            access_log.info(
                "request",
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                    "request_id": request_id,
                    "user": getattr(principal, "user_id", None),
                    "org": getattr(principal, "org_id", None),
                },
            )

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            rest = scope.get(RESPONSE_REST)
            if rest is None:
                log()
            else:
                scope[RESPONSE_REST] = then(rest, log)  # the line is written when the stream ends


def _incoming_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == _HEADER:
            text: str = value.decode("latin-1").strip()
            if 0 < len(text) <= _MAX_ID and text.isprintable():
                return text
    return None
