"""Resuming a stream: ``GET /v1/chats/{id}/stream`` replays a chat turn's kept events (storage/tapes.py),
then follows it live to its end, on any instance."""

from __future__ import annotations

import asyncio
import uuid

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.api.chats import owner_of
from gateway.api.schemas import chat_id_of
from gateway.edge.errors import ChatNotFound, InvalidEventId, TooManyReaders, Unavailable
from gateway.services import Services, services_of
from gateway.streaming.replay import Replay, new_reader
from storage import chats
from storage.chats import Owner
from storage.tapes import CHAT, Current, Entry, Tapes

# How long a resume naming an event the turn has not kept yet waits for it: its sender's client may have
# seen it a flush before Redis did.
_AHEAD_FLUSHES = 5


def event_id_of(request: Request) -> int:
    """The event a resumer has seen: ``Last-Event-ID``, else ``?after=``; 0 (none) when neither is given."""
    raw = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise InvalidEventId("The event id must be a whole number")
    return int(raw)


def message_id_of(request: Request) -> uuid.UUID | None:
    raw = request.query_params.get("message_id")
    if raw is None:
        return None
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise InvalidEventId("message_id is not a message id") from None


async def resume(
    services: Services, owner: Owner, chat_id: uuid.UUID, message_id: uuid.UUID | None, after: int, format: str,
    headers: dict[str, str] | None = None, unknown_chat: int = 404,
) -> Response:
    """The stream of the chat's current turn (or of turn ``message_id``) after event ``after``; 204 when no
    such turn is kept; ``unknown_chat`` (404) for a chat that is not the caller's."""
    tapes = services.streams.tapes
    current = None
    if tapes is not None:
        try:
            current = await _current(services, tapes, owner, chat_id)
        except (RedisError, OSError):
            raise Unavailable("The store of resumable streams is unavailable") from None
    if current is None or current.owner != owner:
        if await chats.get_chat(services.pool, owner, chat_id) is None and unknown_chat == 404:
            raise ChatNotFound()
        return Response(status_code=204)
    assert tapes is not None
    if current.format != format:  # a turn sent with the other protocol: resumed with it
        return Response(status_code=204)
    key = tapes.turn_key(chat_id, message_id or current.message_id)
    reader = new_reader()
    try:
        entries = await _entries(services, key, after, format, reader)
    except (RedisError, OSError):
        await tapes.leave(reader)
        raise Unavailable("The store of resumable streams is unavailable") from None
    except BaseException:
        await tapes.leave(reader)
        raise
    if entries is None:
        await tapes.leave(reader)
        return Response(status_code=204)
    settings = services.settings
    return Replay(tapes, key, reader, after, entries, headers or {}, settings.ping_s, settings.send_timeout_s,
                  lost_s=min(1.0, settings.stream_lease_s / 6))


async def _current(services: Services, tapes: Tapes, owner: Owner, chat_id: uuid.UUID) -> Current | None:
    """The chat's kept turn; one the chat's lease names but no flush has kept yet is waited for (a few
    flushes), so a resume right after a send's first event finds that turn, not the one before."""
    lease_key = services.quotas.store.lease_key(owner.org_id, str(chat_id))
    for _ in range(_AHEAD_FLUSHES):
        current, running = await tapes.current(chat_id, lease_key)
        if running is None or (current is not None and current.message_id == running):
            return current
        await asyncio.sleep(services.settings.resume_flush_s)
    return current


async def _entries(services: Services, key: str, after: int, format: str, reader: str) -> list[Entry] | None:
    """The kept entries holding the turn's events past ``after`` (none yet: the reader follows it live);
    None when there is nothing to resume: no such turn kept, or it ended with event ``after``."""
    tapes = services.streams.tapes
    assert tapes is not None
    placed, entries = await tapes.read(key, after, reader)
    if not placed:
        raise TooManyReaders()
    if entries:
        if format == CHAT and not _holds(entries[0], after):
            raise InvalidEventId("The events after this id are no longer kept")
        return entries
    if after == 0:
        return None
    _, kept = await tapes.read(key, after - 1)
    if kept:  # event ``after`` is the last kept so far
        return None if b"e" in kept[-1][1] else []
    # An event not kept yet: the sender's client may have seen it a flush or so before Redis did.
    entries = await tapes.follow(key, after, services.settings.resume_flush_s * _AHEAD_FLUSHES)
    if not entries:
        raise InvalidEventId()
    return entries


def _holds(entry: Entry, after: int) -> bool:
    """Whether ``entry``, the first past event ``after``, holds the event right after it: else the events
    between were dropped (a turn's oldest go past its length cap)."""
    data = entry[1].get(b"d", b"")
    return data.startswith(b"id: %d\n" % (after + 1)) or b"\n\nid: %d\n" % (after + 1) in data


async def resume_chat(request: Request) -> Response:
    chat_id = chat_id_of(request)
    return await resume(services_of(request), owner_of(request), chat_id, message_id_of(request),
                        event_id_of(request), CHAT)


routes = [Route("/v1/chats/{chat_id}/stream", resume_chat, methods=["GET"])]
