"""The demo chat page at ``/`` (static files, no build step) and, in development only, a token minter."""

from __future__ import annotations

import uuid
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from gateway.edge.auth import mint_token
from gateway.edge.errors import NotFound
from gateway.edge.responses import JSONBody
from gateway.embedded import resolve_jwt_secret
from gateway.services import services_of

STATIC = Path(__file__).parent.parent / "static"


async def index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def dev_token(request: Request) -> Response:
    """A token for a fresh demo user: only when the gateway runs with embedded services or dev mode."""
    settings = services_of(request).settings
    if not settings.dev_mode:
        raise NotFound()
    if request.method == "HEAD":
        return Response(status_code=200)
    user = f"demo-{uuid.uuid4().hex[:8]}"
    return JSONBody({"token": mint_token(resolve_jwt_secret(settings), user, "demo", ttl_s=24 * 3600),
                     "user": user, "org": "demo"})


routes = [
    Route("/", index),
    Route("/dev/token", dev_token, methods=["POST", "HEAD"]),
    Mount("/static", StaticFiles(directory=STATIC), name="static"),
]
