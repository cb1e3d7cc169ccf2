"""The message aggregate: pages of a chat's messages and the writes of a streamed turn."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from storage.chats import Executor, Owner
from storage.queries import SQL


def message_record(row: asyncpg.Record) -> dict[str, Any]:
    input_tokens, output_tokens = row["input_tokens"], row["output_tokens"]
    usage = None
    if input_tokens is not None or output_tokens is not None:
        usage = {
            "input_tokens": input_tokens or 0,
            "output_tokens": output_tokens or 0,
            "total_tokens": (input_tokens or 0) + (output_tokens or 0),
            "estimated": row["usage_estimated"],
        }
    return {
        "id": row["id"],
        "chat_id": row["chat_id"],
        "role": row["role"],
        "content": row["content"],
        "parts": row["parts"],
        "status": row["status"],
        "finish_reason": row["finish_reason"],
        "model": row["model"],
        "usage": usage,
        "metadata": row["metadata"],
        "created_at": row["created_at"],
        "completed_at": row["completed_at"],
    }


async def list_messages(
    db: Executor, owner: Owner, chat_id: uuid.UUID, *, limit: int, offset: int, order: str
) -> tuple[list[dict[str, Any]], int]:
    query = SQL["list_messages_desc" if order == "desc" else "list_messages_asc"]
    rows = await db.fetch(query, chat_id, owner.org_id, owner.user_id, limit, offset)
    if rows:
        return [message_record(row) for row in rows], rows[0]["total"]
    return [], await db.fetchval(SQL["count_messages"], chat_id, owner.org_id, owner.user_id)


async def get_message(db: Executor, owner: Owner, message_id: uuid.UUID) -> dict[str, Any] | None:
    row = await db.fetchrow(SQL["get_message"], message_id, owner.org_id, owner.user_id)
    return message_record(row) if row else None


@dataclass(frozen=True, slots=True)
class TurnContext:
    """What a new turn needs to know about its chat: the model, the system prompt and recent history."""

    chat_id: uuid.UUID
    title: str | None
    model: str
    system_prompt: str | None
    # (role, content, parts), oldest first; parts only for a message that has attachments, else None
    history: list[tuple[str, str, list[dict[str, Any]] | None]]
    duplicate: bool = False  # the chat already holds a message with the turn's client_message_id


@functools.cache
def chat_for_turn_query(history_messages: int) -> str:
    """The read before a turn, its history limit written in. Given as a parameter, the limit had
    PostgreSQL plan the read afresh on every call: a generic plan, not knowing it, reckons with a tenth of
    the chat's messages and always costs more than a custom one (0.21 ms a read; 0.10 planned once)."""
    return SQL["chat_for_turn"].replace("{history_messages}", str(int(history_messages)))


async def chat_for_turn(
    db: Executor, owner: Owner, chat_id: uuid.UUID, history_messages: int, client_message_id: str | None = None,
    new_message_id: uuid.UUID | None = None,
) -> TurnContext | None:
    """The chat's context for a turn; None when the owner has no such chat. With ``client_message_id``,
    ``duplicate`` tells whether the chat already holds it (checked in the same round trip). The turn's own
    message (``new_message_id``), when its write may already be done, is neither history nor a duplicate."""
    row = await db.fetchrow(
        chat_for_turn_query(history_messages), chat_id, owner.org_id, owner.user_id, client_message_id,
        new_message_id)
    if row is None:
        return None
    history = list(zip(row["roles"] or (), row["contents"] or (), row["parts"] or (), strict=True))
    history.reverse()
    return TurnContext(row["id"], row["title"], row["model"], row["system_prompt"], history, row["duplicate"])


@dataclass(frozen=True, slots=True)
class NewTurn:
    chat_id: uuid.UUID
    user_message_id: uuid.UUID
    assistant_message_id: uuid.UUID
    content: str
    title: str
    model: str
    parts: list[dict[str, Any]]
    client_message_id: str | None
    metadata: dict[str, Any]


async def client_message(
    db: Executor, owner: Owner, chat_id: uuid.UUID, client_message_id: str
) -> tuple[uuid.UUID, uuid.UUID | None] | None:
    """The ids of the message ``client_message_id`` names in the chat, and of its reply; None if none."""
    row = await db.fetchrow(SQL["client_message"], chat_id, client_message_id, owner.org_id, owner.user_id)
    return None if row is None else (row["user_message_id"], row["assistant_message_id"])


@dataclass(frozen=True, slots=True)
class ChatBefore:
    """A chat's activity time and title as they were before a turn's write moved them."""

    updated_at: datetime
    title: str | None


async def insert_turn(db: Executor, owner: Owner, turn: NewTurn) -> ChatBefore | None:
    """Store the user's message and an empty streaming reply; the chat as it was before, or None when the
    chat is gone."""
    row = await db.fetchrow(
        SQL["insert_turn"],
        turn.chat_id,
        owner.org_id,
        owner.user_id,
        turn.user_message_id,
        turn.assistant_message_id,
        turn.title,
        turn.content,
        turn.parts,
        turn.client_message_id,
        turn.metadata,
        turn.model,
    )
    return None if row is None else ChatBefore(row["updated_at"], row["title"])


async def unstore_turn(db: Executor, owner: Owner, turn: NewTurn, before: ChatBefore) -> None:
    """Take back a turn ``insert_turn`` stored and nothing has answered: its two messages deleted, the chat's
    activity time and title as ``before`` (unless the chat has moved since)."""
    await db.execute(SQL["unstore_turn"], turn.chat_id, owner.org_id, owner.user_id, turn.user_message_id,
                     turn.assistant_message_id, before.updated_at, before.title)


@dataclass(frozen=True, slots=True)
class FinishedReply:
    message_id: uuid.UUID
    content: str
    status: str
    finish_reason: str
    model: str
    input_tokens: int
    output_tokens: int
    usage_estimated: bool
    metadata: dict[str, Any]
    charged_tokens: int


async def finish_reply(db: Executor, reply: FinishedReply) -> None:
    """Store the reply's ending and write its usage to the ledger, in one statement."""
    await db.execute(
        SQL["finish_message"],
        reply.message_id,
        reply.content,
        reply.status,
        reply.finish_reason,
        reply.model,
        reply.input_tokens,
        reply.output_tokens,
        reply.usage_estimated,
        reply.metadata,
        reply.charged_tokens,
    )


async def checkpoint_replies(db: Executor, ids: Sequence[uuid.UUID], deltas: Sequence[str]) -> None:
    """Append each delta to its streaming reply's content."""
    await db.execute(SQL["checkpoint_messages"], list(ids), list(deltas))


async def streaming_replies(db: Executor, older_than_s: float) -> list[tuple[uuid.UUID, uuid.UUID, str]]:
    """Replies still streaming: their id, chat id and org id."""
    rows = await db.fetch(SQL["streaming_messages"], older_than_s)
    return [(row["id"], row["chat_id"], row["org_id"]) for row in rows]


async def interrupt_replies(db: Executor, ids: Sequence[uuid.UUID]) -> int:
    status = await db.execute(SQL["interrupt_messages"], list(ids))
    return int(status.split()[-1])
