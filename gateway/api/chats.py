"""The chat endpoints: create, list, read, rename, delete, restore, and the caller's stats."""

from __future__ import annotations

import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.api.schemas import (
    ChatCreate,
    ChatList,
    ChatPatch,
    ChatRead,
    MessagePage,
    PermanentFlag,
    chat_id_of,
    parse_body,
    parse_query,
)
from gateway.edge.auth import principal_of
from gateway.edge.errors import ChatLimitReached, ChatNotFound
from gateway.edge.responses import JSONBody
from gateway.services import Services, services_of
from storage import chats, messages
from storage.chats import ChatFields, ChatLimitExceeded, Owner


def owner_of(request: Request) -> Owner:
    principal = principal_of(request)
    return Owner(principal.org_id, principal.user_id)


async def new_chat(
    services: Services, owner: Owner, fields: ChatFields, chat_id: uuid.UUID | None = None
) -> dict[str, Any]:
    """Create a chat for the caller; past ``GATEWAY_MAX_CHATS_PER_USER`` it is a 403 ``chat_limit_reached``."""
    try:
        return await chats.create_chat(
            services.pool, owner, fields, services.settings.max_chats_per_user, chat_id
        )
    except ChatLimitExceeded:
        raise ChatLimitReached() from None


async def create_chat(request: Request) -> Response:
    body = await parse_body(request, ChatCreate)
    services = services_of(request)
    fields = ChatFields(
        body.title, body.model or services.settings.default_model, body.system_prompt, body.metadata
    )
    return JSONBody(await new_chat(services, owner_of(request), fields), status_code=201)


async def list_chats(request: Request) -> Response:
    query = parse_query(request, ChatList)
    items, total = await chats.list_chats(
        services_of(request).pool,
        owner_of(request),
        query=query.q,
        deleted=query.deleted,
        limit=query.limit,
        offset=query.offset,
    )
    return JSONBody({"items": items, "total": total, "limit": query.limit, "offset": query.offset})


async def read_chat(request: Request) -> Response:
    query = parse_query(request, ChatRead)
    chat_id, owner, pool = chat_id_of(request), owner_of(request), services_of(request).pool
    chat = await chats.get_chat(pool, owner, chat_id)
    if chat is None:
        raise ChatNotFound()
    chat["messages"], chat["message_count"] = await messages.list_messages(
        pool, owner, chat_id, limit=query.message_limit, offset=query.message_offset, order=query.order
    )
    return JSONBody(chat)


async def list_messages(request: Request) -> Response:
    query = parse_query(request, MessagePage)
    chat_id, owner, pool = chat_id_of(request), owner_of(request), services_of(request).pool
    if await chats.get_chat(pool, owner, chat_id) is None:
        raise ChatNotFound()
    items, total = await messages.list_messages(
        pool, owner, chat_id, limit=query.limit, offset=query.offset, order=query.order
    )
    return JSONBody({"items": items, "total": total, "limit": query.limit, "offset": query.offset})


async def patch_chat(request: Request) -> Response:
    chat_id = chat_id_of(request)
    body = await parse_body(request, ChatPatch)
    # Only the fields the client sent are applied; a null model resets the chat to the default model.
    model = body.model or services_of(request).settings.default_model
    fields = ChatFields(
        body.title, model, body.system_prompt, body.metadata, frozenset(body.model_fields_set)
    )
    chat = await chats.update_chat(services_of(request).pool, owner_of(request), chat_id, fields)
    if chat is None:
        raise ChatNotFound()
    return JSONBody(chat)


async def delete_chat(request: Request) -> Response:
    chat_id = chat_id_of(request)
    flags = parse_query(request, PermanentFlag)
    pool, owner = services_of(request).pool, owner_of(request)
    erase = chats.erase_chat if flags.permanent else chats.soft_delete_chat
    if not await erase(pool, owner, chat_id):
        raise ChatNotFound()
    return Response(status_code=204)


async def restore_chat(request: Request) -> Response:
    chat_id = chat_id_of(request)
    services = services_of(request)
    try:
        chat = await chats.restore_chat(
            services.pool, owner_of(request), chat_id, services.settings.max_chats_per_user
        )
    except ChatLimitExceeded:
        raise ChatLimitReached() from None
    if chat is None:
        raise ChatNotFound()
    return JSONBody(chat)


async def stats(request: Request) -> Response:
    return JSONBody(await chats.owner_stats(services_of(request).pool, owner_of(request)))


routes = [
    Route("/v1/chats", create_chat, methods=["POST"]),
    Route("/v1/chats", list_chats, methods=["GET"]),
    Route("/v1/chats/{chat_id}", read_chat, methods=["GET"]),
    Route("/v1/chats/{chat_id}", patch_chat, methods=["PATCH"]),
    Route("/v1/chats/{chat_id}", delete_chat, methods=["DELETE"]),
    Route("/v1/chats/{chat_id}/messages", list_messages, methods=["GET"]),
    Route("/v1/chats/{chat_id}/restore", restore_chat, methods=["POST"]),
    Route("/v1/stats", stats, methods=["GET"]),
]
