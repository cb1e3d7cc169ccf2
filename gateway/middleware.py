"""Request id and the access log, as one pure ASGI middleware (it sees streaming bodies and disconnects)."""

from __future__ import annotations

import logging
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

access_log = logging.getLogger("gateway.access")

_HEADER = b"x-request-id"
_MAX_ID = 128
# Where a streaming response finds the server's send, beneath the middleware stack (set by the app,
# gateway/app.py). The wrappers between (ours, Starlette's error and exception handling) only look at a
# response's start; a stream sends its body frames, one per provider read, below them.
BODY_SEND = "gateway.body_send"


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

        try:
            await self.app(scope, receive, send_with_id)
        finally:
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


def _incoming_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == _HEADER:
            text: str = value.decode("latin-1").strip()
            if 0 < len(text) <= _MAX_ID and text.isprintable():
                return text
    return None
