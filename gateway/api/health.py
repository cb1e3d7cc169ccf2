"""Liveness and readiness."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.edge.errors import Unavailable, envelope
from gateway.services import services_of

_CHECK_TIMEOUT_S = 2.0


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    services = services_of(request)
    checks = await asyncio.gather(
        _check(services.pool.fetchval("SELECT 1")),
        _check(services.redis.ping()),
    )
    report = dict(zip(("postgres", "redis"), checks, strict=True))
    if all(state == "ok" for state in report.values()):
        return JSONResponse({"status": "ready", "checks": report})
    failed = ", ".join(name for name, state in report.items() if state != "ok")
    return envelope(request, Unavailable(f"Not ready: {failed} unavailable", details=report))


async def _check(probe: object) -> str:
    try:
        await asyncio.wait_for(probe, _CHECK_TIMEOUT_S)  # type: ignore[arg-type]
    except Exception as error:
        return f"error: {type(error).__name__}"
    return "ok"


routes = [Route("/health", health), Route("/ready", ready)]
