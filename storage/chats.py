"""The chat aggregate: every statement filters by (org_id, user_id) in SQL; reads of chats shared with an
org filter by org_id and visibility, and a share link's read (storage/messages.py) by its random id."""

from __future__ import annotations

import functools
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypeAlias

import asyncpg

from storage.db import Pool
from storage.queries import SQL

Executor: TypeAlias = "Pool | asyncpg.Connection[asyncpg.Record]"

_WORD = re.compile(r"\w+")

Visibility: TypeAlias = Literal["private", "org", "public"]
# Every chat's fields but its share link, which only its owner sees.
_CHAT_FIELDS = (
    "id", "title", "model", "system_prompt", "metadata", "visibility", "created_at", "updated_at", "deleted_at"
)
_AGENT_FIELDS = ("tools", "tool_choice", "reasoning_effort")
# Random bytes of a share link: 128 bits, 22 URL-safe characters.
SHARE_ID_BYTES = 16


@dataclass(frozen=True, slots=True)
class Owner:
    org_id: str
    user_id: str


@dataclass(frozen=True, slots=True)
class ChatFields:
    """Fields of a chat a client may set; ``present`` names those a PATCH actually sent."""

    title: str | None = None
    model: str | None = None
    system_prompt: str | None = None
    metadata: dict[str, Any] | None = None
    present: frozenset[str] = frozenset()
    visibility: Visibility | None = None
    # The chat's agent defaults, used by a send that names none: tools (OpenAI function format), tool
    # choice, reasoning effort.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    reasoning_effort: str | None = None


class ChatLimitExceeded(Exception):
    pass


def chat_record(row: asyncpg.Record | None, owner_view: bool = True) -> dict[str, Any]:
    """The chat as its owner sees it (with ``share_id``), or as another member of its org does."""
    assert row is not None
    record = {key: row[key] for key in _CHAT_FIELDS}
    for key in _AGENT_FIELDS:  # in a single chat's reads, not in listings
        if key in row:
            record[key] = row[key]
    if owner_view:
        record["share_id"] = row["share_id"]
    return record


async def create_chat(
    pool: Pool, owner: Owner, fields: ChatFields, cap: int | None, chat_id: uuid.UUID | None = None
) -> dict[str, Any]:
    args = (
        chat_id or uuid.uuid4(),
        owner.org_id,
        owner.user_id,
        fields.title,
        fields.model,
        fields.system_prompt,
        fields.metadata or {},
        fields.visibility or "private",
    )
    if cap is None:
        return chat_record(await pool.fetchrow(SQL["insert_chat"], *args))
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(SQL["lock_owner"], owner.org_id, owner.user_id)
        if await conn.fetchval(SQL["count_active_chats"], owner.org_id, owner.user_id) >= cap:
            raise ChatLimitExceeded()
        return chat_record(await conn.fetchrow(SQL["insert_chat"], *args))


async def get_chat(db: Executor, owner: Owner, chat_id: uuid.UUID) -> dict[str, Any] | None:
    row = await db.fetchrow(SQL["get_chat"], chat_id, owner.org_id, owner.user_id)
    return chat_record(row) if row else None


async def get_readable_chat(
    db: Executor, reader: Owner, chat_id: uuid.UUID
) -> tuple[dict[str, Any], Owner] | None:
    """The chat as ``reader`` sees it, and its owner: the reader's own, or one another member of the
    reader's org shares with it (visibility org or public). None for any other."""
    row = await db.fetchrow(SQL["get_readable_chat"], chat_id, reader.org_id, reader.user_id)
    if row is None:
        return None
    owner = Owner(reader.org_id, row["user_id"])
    return chat_record(row, owner == reader), owner


def title_search(query: str) -> str | None:
    """A tsquery matching titles that hold every word of ``query``, each word also as a prefix."""
    words = _WORD.findall(query.lower())
    return " & ".join(f"'{word}':*" for word in words) if words else None


ListKind: TypeAlias = Literal["active", "deleted", "all", "org"]
# Whose chats each kind lists (a condition of chats.sql), and its order: newest activity first, the trash
# newest deletion first.
_SCOPES: dict[ListKind, str] = {
    "active": "chats_own_active", "deleted": "chats_own_deleted", "all": "chats_own_all", "org": "chats_org",
}
_KEYS: dict[ListKind, str] = {"active": "updated_at", "deleted": "deleted_at", "all": "updated_at", "org": "updated_at"}


@dataclass(frozen=True, slots=True)
class ChatFilter:
    """What a listing holds: ``kind`` is the reader's live chats, trash or both, or the org's shared chats
    (any member's); each other field narrows it, None (or an empty ``query``) not at all. Bounds of the
    ranges are excluded."""

    kind: ListKind = "active"
    query: str = ""
    model: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    updated_after: datetime | None = None
    updated_before: datetime | None = None
    streaming: bool | None = None


@dataclass(frozen=True, slots=True)
class WalkPoint:
    """Where a walk through a listing stands: the snapshot and time of its first page, and the sort key and
    id of the last chat it listed."""

    snapshot: str
    started: datetime
    key: datetime
    chat_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class ChatPage:
    """A page of a listing, the count of all its matches, and where the next page starts (None: the last)."""

    items: list[dict[str, Any]]
    total: int
    next: WalkPoint | None


@functools.cache
def listing_query(template: str, kind: ListKind) -> str:
    """``list_chats`` or ``list_chats_after`` for one kind of listing: its chats, order and filters written in."""
    return (SQL[template].replace("{filters}", SQL["chat_list_filters"])
            .replace("{chats}", SQL[_SCOPES[kind]]).replace("{key}", _KEYS[kind]))


def listing_args(reader: Owner, match: ChatFilter) -> tuple[Any, ...]:
    """The parameters $1 to $9 of a listing."""
    return (reader.org_id, reader.user_id, title_search(match.query), match.model, match.created_after,
            match.created_before, match.updated_after, match.updated_before, match.streaming)


async def list_chats(
    pool: Pool, reader: Owner, match: ChatFilter, *, limit: int, offset: int = 0, after: WalkPoint | None = None
) -> ChatPage:
    """A page of the reader's listing: ``offset`` chats in, or the one after ``after`` of a walk in the order
    its first page saw (each chat once, wherever writes have moved it since). One more row than the page is
    read to know whether another page follows."""
    args = listing_args(reader, match)
    if after is None:
        rows = await pool.fetch(listing_query("list_chats", match.kind), *args, limit + 1, offset)
        snapshot, started = rows[0]["snapshot"], rows[0]["walk_started"]
    else:
        rows = await pool.fetch(listing_query("list_chats_after", match.kind), *args, limit + 1,
                                after.snapshot, after.key, after.chat_id)
        snapshot, started = after.snapshot, after.started
    chats = [row for row in rows if row["id"] is not None]
    last = chats[limit - 1] if len(chats) > limit else None
    next_point = None if last is None else WalkPoint(snapshot, started, last["walk_key"], last["id"])
    return ChatPage([chat_record(row, row["owned"]) for row in chats[:limit]], rows[0]["total"], next_point)


async def update_chat(
    pool: Pool, owner: Owner, chat_id: uuid.UUID, fields: ChatFields
) -> dict[str, Any] | None:
    sent = fields.present
    row = await pool.fetchrow(
        SQL["update_chat"],
        chat_id,
        owner.org_id,
        owner.user_id,
        "title" in sent,
        fields.title,
        "model" in sent,
        fields.model,
        "system_prompt" in sent,
        fields.system_prompt,
        "metadata" in sent,
        fields.metadata or {},
        "visibility" in sent,
        fields.visibility,
        "tools" in sent,
        fields.tools,
        "tool_choice" in sent,
        fields.tool_choice,
        "reasoning_effort" in sent,
        fields.reasoning_effort,
    )
    return chat_record(row) if row else None


async def soft_delete_chat(pool: Pool, owner: Owner, chat_id: uuid.UUID) -> bool:
    return await pool.fetchval(SQL["soft_delete_chat"], chat_id, owner.org_id, owner.user_id) is not None


async def share_chat(pool: Pool, owner: Owner, chat_id: uuid.UUID) -> str | None:
    """The chat's share link id, made (and the chat made public) unless it has one; None when the owner has
    no such live chat. Two links never clash: 128 random bits (and the unique index would refuse it)."""
    share_id = secrets.token_urlsafe(SHARE_ID_BYTES)
    found: str | None = await pool.fetchval(SQL["share_chat"], chat_id, owner.org_id, owner.user_id, share_id)
    return found


async def unshare_chat(pool: Pool, owner: Owner, chat_id: uuid.UUID) -> bool:
    """Revoke the chat's share link (none is fine); False when the owner has no such live chat."""
    return await pool.fetchval(SQL["unshare_chat"], chat_id, owner.org_id, owner.user_id) is not None


async def erase_chat(pool: Pool, owner: Owner, chat_id: uuid.UUID) -> bool:
    return await pool.fetchval(SQL["erase_chat"], chat_id, owner.org_id, owner.user_id) is not None


async def erase_empty_chat(pool: Pool, owner: Owner, chat_id: uuid.UUID, made_at: datetime) -> bool:
    """Erase the chat if it holds no message and is as it was made at ``made_at`` (its ``updated_at``): a
    refused first turn's. Whether it did."""
    return await pool.fetchval(SQL["erase_empty_chat"], chat_id, owner.org_id, owner.user_id, made_at) is not None


async def erase_org(db: Executor, org_id: str) -> None:
    """Everything stored for an org: its chats, their messages and its usage ledger."""
    await db.execute(SQL["erase_org"], org_id)


async def restore_chat(
    pool: Pool, owner: Owner, chat_id: uuid.UUID, cap: int | None
) -> dict[str, Any] | None:
    async with pool.acquire() as conn, conn.transaction():
        if cap is not None:
            await conn.execute(SQL["lock_owner"], owner.org_id, owner.user_id)
            if await conn.fetchval(SQL["count_active_chats"], owner.org_id, owner.user_id) >= cap:
                raise ChatLimitExceeded()
        row = await conn.fetchrow(SQL["restore_chat"], chat_id, owner.org_id, owner.user_id)
    return chat_record(row) if row else None


async def owner_stats(pool: Pool, owner: Owner) -> dict[str, int]:
    row = await pool.fetchrow(SQL["owner_stats"], owner.org_id, owner.user_id)
    assert row is not None
    return dict(row)


async def set_model_title(db: Executor, owner: Owner, chat_id: uuid.UUID, cut_title: str, title: str) -> bool:
    """Title the chat with a model's ``title`` if it still carries ``cut_title`` (its first message, cut):
    False when the user has named it since, or it is gone."""
    return await db.fetchval(SQL["set_model_title"], chat_id, owner.org_id, owner.user_id, cut_title,
                             title) is not None


async def prune_chat_moves(db: Executor) -> int:
    """Delete a batch of expired chat moves (what a cursor walk no longer needs); how many went."""
    status = await db.execute(SQL["prune_chat_moves"])
    return int(status.split()[-1])
