"""The chat endpoints: create, list, read, rename, delete, restore, share, and the caller's stats.

Only a chat's owner changes it. Members of its org read it (and list it with ``scope=org``) while its
visibility is ``org`` or ``public``; to anyone else it is missing (404)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.api.cursors import read_cursor, write_cursor
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
from storage.chats import ChatFields, ChatFilter, ChatLimitExceeded, ListKind, Owner


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
        body.title, body.model or services.settings.default_model, body.system_prompt, body.metadata,
        visibility=body.visibility,
    )
    return JSONBody(await new_chat(services, owner_of(request), fields), status_code=201)


async def list_chats(request: Request) -> Response:
    """A page of the caller's chats (or the org's shared ones): by ``offset``, or after a ``cursor``; its
    ``next_cursor`` walks on in the order the walk's first page saw (docs/api.md, Listing chats)."""
    query = parse_query(request, ChatList)
    match = chat_filter(query)
    after = None if query.cursor is None else read_cursor(query.cursor, match, datetime.now(UTC))
    page = await chats.list_chats(
        services_of(request).pool, owner_of(request), match, limit=query.limit, offset=query.offset, after=after
    )
    return JSONBody({
        "items": page.items, "total": page.total, "limit": query.limit,
        "offset": None if after is not None else query.offset,
        "next_cursor": None if page.next is None else write_cursor(page.next, match),
    })


def chat_filter(query: ChatList) -> ChatFilter:
    kind: ListKind = "org" if query.scope == "org" else query.listed_status
    return ChatFilter(kind, query.q, query.model, query.created_after, query.created_before,
                      query.updated_after, query.updated_before, query.streaming)


async def readable_chat(request: Request) -> tuple[dict[str, Any], Owner]:
    """The path's chat as the caller may read it, and its owner (the caller, or a member sharing it with
    the org); 404 for any other chat."""
    found = await chats.get_readable_chat(services_of(request).pool, owner_of(request), chat_id_of(request))
    if found is None:
        raise ChatNotFound()
    return found


async def read_chat(request: Request) -> Response:
    query = parse_query(request, ChatRead)
    chat, owner = await readable_chat(request)
    chat["messages"], chat["message_count"] = await messages.list_messages(
        services_of(request).pool, owner, chat["id"],
        limit=query.message_limit, offset=query.message_offset, order=query.order,
    )
    return JSONBody(chat)


async def list_messages(request: Request) -> Response:
    query = parse_query(request, MessagePage)
    chat, owner = await readable_chat(request)
    items, total = await messages.list_messages(
        services_of(request).pool, owner, chat["id"], limit=query.limit, offset=query.offset, order=query.order
    )
    return JSONBody({"items": items, "total": total, "limit": query.limit, "offset": query.offset})


async def patch_chat(request: Request) -> Response:
    chat_id = chat_id_of(request)
    body = await parse_body(request, ChatPatch)
    # Only the fields the client sent are applied; a null model resets the chat to the default model.
    model = body.model or services_of(request).settings.default_model
    fields = ChatFields(
        body.title, model, body.system_prompt, body.metadata, frozenset(body.model_fields_set), body.visibility,
        *agent_defaults(body),
    )
    chat = await chats.update_chat(services_of(request).pool, owner_of(request), chat_id, fields)
    if chat is None:
        raise ChatNotFound()
    return JSONBody(chat)


def agent_defaults(body: ChatPatch) -> tuple[list[dict[str, Any]] | None, str | dict[str, Any] | None, str | None]:
    """A PATCH's tools, tool choice and reasoning effort as the chat keeps them (JSON)."""
    tools = None if body.tools is None else [tool.model_dump(exclude_none=True) for tool in body.tools]
    choice = body.tool_choice
    return tools, choice if choice is None or isinstance(choice, str) else choice.model_dump(), body.reasoning_effort


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


async def share_chat(request: Request) -> Response:
    """The chat's share link (made, and the chat made public, unless it has one): ``{share_id, url}``."""
    chat_id = chat_id_of(request)
    share_id = await chats.share_chat(services_of(request).pool, owner_of(request), chat_id)
    if share_id is None:
        raise ChatNotFound()
    url = f"{str(request.base_url).rstrip('/')}/v1/shared/{share_id}"
    return JSONBody({"share_id": share_id, "url": url})


async def unshare_chat(request: Request) -> Response:
    chat_id = chat_id_of(request)
    if not await chats.unshare_chat(services_of(request).pool, owner_of(request), chat_id):
        raise ChatNotFound()
    return Response(status_code=204)


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
    Route("/v1/chats/{chat_id}/share", share_chat, methods=["POST"]),
    Route("/v1/chats/{chat_id}/share", unshare_chat, methods=["DELETE"]),
    Route("/v1/stats", stats, methods=["GET"]),
]
