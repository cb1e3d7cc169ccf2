"""A send retried with its ``client_message_id`` is recognised: answered 409 with what was stored, the
provider not called, nothing stored twice; and the migration that made the id unique per chat."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from gateway.api.schemas import SendMessage
from gateway.api.send import TurnWrite
from gateway.edge.errors import DuplicateMessage
from gateway.settings import Settings
from gateway.streaming.turns import TurnIds
from providers.fake import FakeProvider
from storage.chats import Owner
from storage.db import Pool
from storage.migrations import migrate, migrations_dir
from tests.api.test_send import new_chat
from tests.conftest import Gateway, database_named
from tests.streaming.test_admission import chat_rows

JSON = {"Accept": "application/json"}


async def send(client: httpx.AsyncClient, headers: dict[str, str], chat_id: str, **body: Any) -> httpx.Response:
    return await client.post(f"/v1/chats/{chat_id}/messages", headers={**headers, **JSON}, json=body)


async def test_a_retried_send_is_refused_with_what_was_stored_and_changes_nothing(
    client: httpx.AsyncClient, alice: dict[str, str], db: Pool, gateway: Gateway
) -> None:
    chat_id = await new_chat(client, alice)
    first = (await send(client, alice, chat_id, content="only once", client_message_id="m-1")).json()
    before = await chat_rows(db, chat_id)
    fake = gateway.services.providers.get("fake")
    assert isinstance(fake, FakeProvider)
    streams = len(fake.records)
    retried = await send(client, alice, chat_id, content="only once", client_message_id="m-1")
    assert retried.status_code == 409
    error = retried.json()["error"]
    assert error["code"] == "duplicate_message"
    assert error["details"] == {"user_message_id": first["user_message"]["id"],
                                "assistant_message_id": first["assistant_message"]["id"]}
    assert await chat_rows(db, chat_id) == before and len(fake.records) == streams
    # The refusal gave its admission back; the id is the chat's own: another chat may use it.
    assert (await send(client, alice, chat_id, content="next", client_message_id="m-2")).status_code == 200
    other = await new_chat(client, alice)
    assert (await send(client, alice, other, content="only once", client_message_id="m-1")).status_code == 200


async def test_the_same_id_stored_at_once_twice_is_refused_at_the_write(
    client: httpx.AsyncClient, alice: dict[str, str], gateway: Gateway
) -> None:
    """Two sends of one id that both passed the read (the chat's lease keeps them apart unless Redis is
    down in fail-open mode): the unique index turns the second write down."""
    chat_id = await new_chat(client, alice)
    first = (await send(client, alice, chat_id, content="raced", client_message_id="r-1")).json()
    message = first["user_message"]
    row = await gateway.services.pool.fetchrow("SELECT org_id, user_id FROM chats WHERE id = $1", uuid.UUID(chat_id))
    owner = Owner(row["org_id"], row["user_id"])
    ids = TurnIds(uuid.UUID(chat_id), uuid.uuid4(), uuid.uuid4())
    options = SendMessage(content="raced", client_message_id="r-1")
    with pytest.raises(DuplicateMessage) as refused:
        await TurnWrite(gateway.services, owner, ids, "raced", options).done("fake/echo")
    assert refused.value.details == {"user_message_id": message["id"],
                                     "assistant_message_id": first["assistant_message"]["id"]}


async def test_the_migration_keeps_the_first_of_each_duplicate_id(
    settings: Settings, db: Pool, tmp_path: Path
) -> None:
    name = f"sg_ids_{uuid.uuid4().hex[:8]}"
    await db.execute(f'CREATE DATABASE "{name}"')
    assert settings.database_url
    url = database_named(settings.database_url, name)
    try:
        for path in sorted(migrations_dir().glob("000[1-4]_*.sql")):
            shutil.copy(path, tmp_path)
        await migrate(url, tmp_path)
        conn = await asyncpg.connect(url)
        try:
            chat = uuid.uuid4()
            await conn.execute("INSERT INTO chats (id, org_id, user_id, model) VALUES ($1, 'o', 'u', 'fake/echo')", chat)
            ids = [uuid.uuid4() for _ in range(4)]
            for message_id, client_id in zip(ids, ["a", "a", "b", "a"], strict=True):
                await conn.execute("INSERT INTO messages (id, chat_id, org_id, user_id, role, content, client_message_id)"
                                   " VALUES ($1, $2, 'o', 'u', 'user', 'x', $3)", message_id, chat, client_id)
            shutil.copy(migrations_dir() / "0005_client_message_ids.sql", tmp_path)
            assert await migrate(url, tmp_path) == ["0005_client_message_ids"]
            kept = await conn.fetch("SELECT id, client_message_id FROM messages ORDER BY seq")
            assert [(r["id"], r["client_message_id"]) for r in kept] == [
                (ids[0], "a"), (ids[1], None), (ids[2], "b"), (ids[3], None)]
            assert [r["content"] for r in await conn.fetch("SELECT content FROM messages")] == ["x"] * 4
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.execute("INSERT INTO messages (id, chat_id, org_id, user_id, role, content, client_message_id)"
                                   " VALUES ($1, $2, 'o', 'u', 'user', 'y', 'b')", uuid.uuid4(), chat)
        finally:
            await conn.close()
    finally:
        await db.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


async def test_a_retried_ui_submit_is_refused_and_a_regenerate_is_not(
    client: httpx.AsyncClient, alice: dict[str, str], db: Pool
) -> None:
    def body(trigger: str) -> dict[str, Any]:
        return {"id": chat, "trigger": trigger, "messages": [
            {"id": "user-msg-1", "role": "user", "parts": [{"type": "text", "text": "once please"}]}]}

    chat = f"ui-{uuid.uuid4().hex[:6]}"
    first = await client.post("/v1/ui/chat", headers=alice, json=body("submit-message"))
    assert first.status_code == 200 and first.text.endswith("data: [DONE]\n\n")
    retried = await client.post("/v1/ui/chat", headers=alice, json=body("submit-message"))
    assert retried.status_code == 409 and retried.json()["error"]["code"] == "duplicate_message"
    regenerated = await client.post("/v1/ui/chat", headers=alice, json=body("regenerate-message"))
    assert regenerated.status_code == 200
    rows = await db.fetch("SELECT m.role, m.client_message_id FROM messages m JOIN chats c ON c.id = m.chat_id"
                          " WHERE c.metadata->>'client_chat_id' = $1 ORDER BY m.seq", chat)
    assert [(r["role"], r["client_message_id"]) for r in rows] == [
        ("user", "user-msg-1"), ("assistant", None), ("user", None), ("assistant", None)]
