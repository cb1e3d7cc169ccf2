"""A share link's read, without a token: ``GET /v1/shared/{share_id}``.

It shows a public chat's title and its messages' role, content, parts and time, and nothing else: no ids,
owner, org, model, usage, metadata or system prompt. An unknown id, a revoked link and a chat no longer
public (or deleted) are one answer, so a link's answer tells nothing about ids that are not live links.
"""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.edge.errors import GatewayError
from gateway.edge.responses import JSONBody
from gateway.services import services_of
from storage import messages

# What secrets.token_urlsafe makes of a share link's bytes (storage/chats.py); anything else names no link.
_SHARE_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")


class SharedChatNotFound(GatewayError):
    code, status, message = "shared_chat_not_found", 404, "Shared chat not found"


async def read_shared(request: Request) -> Response:
    share_id = request.path_params["share_id"]
    chat = None
    if _SHARE_ID.fullmatch(share_id):
        chat = await messages.shared_chat(services_of(request).pool, share_id)
    if chat is None:
        raise SharedChatNotFound()
    # Not kept by any cache: a revoked link must stop working at once.
    return JSONBody(chat, headers={"Cache-Control": "no-store"})


routes = [Route("/v1/shared/{share_id}", read_shared, methods=["GET"])]
