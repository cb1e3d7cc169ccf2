"""The chat aggregate: every statement filters by (org_id, user_id) in SQL."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any, TypeAlias

import asyncpg

from storage.db import Pool
from storage.queries import SQL

Executor: TypeAlias = "Pool | asyncpg.Connection[asyncpg.Record]"

_WORD = re.compile(r"\w+")


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


class ChatLimitExceeded(Exception):
    pass


def chat_record(row: asyncpg.Record | None) -> dict[str, Any]:
    assert row is not None
    return {
        key: row[key]
        for key in (
            "id",
            "title",
            "model",
            "system_prompt",
            "metadata",
            "created_at",
            "updated_at",
            "deleted_at",
        )
    }


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


def title_search(query: str) -> str | None:
    """A tsquery matching titles that hold every word of ``query``, each word also as a prefix."""
    words = _WORD.findall(query.lower())
    return " & ".join(f"'{word}':*" for word in words) if words else None


async def list_chats(
    pool: Pool, owner: Owner, *, query: str, deleted: bool, limit: int, offset: int
) -> tuple[list[dict[str, Any]], int]:
    kind = "deleted" if deleted else "active"
    pattern = title_search(query)
    rows = await pool.fetch(SQL[f"list_{kind}_chats"], owner.org_id, owner.user_id, pattern, limit, offset)
    if rows:
        return [chat_record(row) for row in rows], rows[0]["total"]
    # An empty page (offset past the end) carries no window count, so count on its own.
    total = await pool.fetchval(SQL[f"count_{kind}_matching"], owner.org_id, owner.user_id, pattern)
    return [], total


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
    )
    return chat_record(row) if row else None


async def soft_delete_chat(pool: Pool, owner: Owner, chat_id: uuid.UUID) -> bool:
    return await pool.fetchval(SQL["soft_delete_chat"], chat_id, owner.org_id, owner.user_id) is not None


async def erase_chat(pool: Pool, owner: Owner, chat_id: uuid.UUID) -> bool:
    return await pool.fetchval(SQL["erase_chat"], chat_id, owner.org_id, owner.user_id) is not None


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
