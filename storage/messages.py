"""The message aggregate: pages of a chat's messages and the writes of a streamed turn."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import asyncpg
import orjson

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
        if row.get("reasoning_tokens") is not None:
            usage["reasoning_tokens"] = row["reasoning_tokens"]
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
    """What a new turn needs to know about its chat: the model, the system prompt, its default tools and
    reasoning effort, and recent history."""

    chat_id: uuid.UUID
    title: str | None
    model: str
    system_prompt: str | None
    history: list[HistoryMessage]  # oldest first
    duplicate: bool = False  # the chat already holds a message with the turn's client_message_id
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    reasoning_effort: str | None = None


class HistoryMessage(NamedTuple):
    """A stored message as history: its parts only for a user's message with attachments (else None), and
    always for a reply or a tool message; ``model``, the reply's."""

    role: str
    content: str
    parts: list[dict[str, Any]] | None = None
    model: str | None = None


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
    history = [HistoryMessage(*fields) for fields in zip(
        row["roles"] or (), row["contents"] or (), row["parts"] or (), row["models"] or (), strict=True)]
    history.reverse()
    return TurnContext(row["id"], row["title"], row["model"], row["system_prompt"], history, row["duplicate"],
                       row["tools"], row["tool_choice"], row["reasoning_effort"])


@dataclass(frozen=True, slots=True)
class NewTurn:
    chat_id: uuid.UUID
    user_message_id: uuid.UUID
    assistant_message_id: uuid.UUID
    content: str
    title: str | None  # None: a message that titles no chat (tool results)
    model: str
    parts: list[dict[str, Any]]
    client_message_id: str | None
    metadata: dict[str, Any]
    role: str = "user"  # or "tool": a message of tool results


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
        turn.role,
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
    parts: list[dict[str, Any]] | None = None  # None: a reply of text alone keeps its parts empty
    reasoning_tokens: int | None = None


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
        reply.parts,
        reply.reasoning_tokens,
    )


async def checkpoint_replies(
    db: Executor, ids: Sequence[uuid.UUID], deltas: Sequence[str], parts: Sequence[list[dict[str, Any]] | None]
) -> None:
    """Append each delta to its streaming reply's content, and write its parts whole where it has some."""
    texts = [None if p is None else orjson.dumps(p).decode() for p in parts]
    await db.execute(SQL["checkpoint_messages"], list(ids), list(deltas), texts)


async def streaming_replies(db: Executor, older_than_s: float) -> list[tuple[uuid.UUID, uuid.UUID, str]]:
    """Replies still streaming: their id, chat id and org id."""
    rows = await db.fetch(SQL["streaming_messages"], older_than_s)
    return [(row["id"], row["chat_id"], row["org_id"]) for row in rows]


async def interrupt_replies(db: Executor, ids: Sequence[uuid.UUID]) -> int:
    status = await db.execute(SQL["interrupt_messages"], list(ids))
    return int(status.split()[-1])


async def interrupt_kept_reply(
    db: Executor, message_id: uuid.UUID, content: str, parts: list[dict[str, Any]] | None
) -> None:
    """Mark a reply whose stream died ``interrupted``, with ``content`` (and ``parts``) when no shorter
    than what its checkpoints stored."""
    await db.execute(SQL["interrupt_message_kept"], message_id, content, parts)


async def shared_chat(db: Executor, share_id: str) -> dict[str, Any] | None:
    """What a share link shows: ``{title, messages: [{role, content, parts, created_at}]}`` and nothing
    more; None for a link that is unknown or revoked, or whose chat is no longer public or is deleted."""
    rows = await db.fetch(SQL["shared_chat"], share_id)
    if not rows:
        return None
    shown = ("role", "content", "parts", "created_at")
    return {"title": rows[0]["title"],
            "messages": [{key: row[key] for key in shown} for row in rows if row["role"] is not None]}
