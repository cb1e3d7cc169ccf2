"""The chat store over real HTTP and PostgreSQL: CRUD, pages, search, trash, isolation and bad input.

Past 400 lines because each chat endpoint's isolation and bad input is checked beside its use.
"""

from __future__ import annotations

import secrets
import uuid
from typing import Any

import httpx
import pytest

from storage.chats import ChatFields, Owner, create_chat, erase_empty_chat, erase_org
from storage.db import Pool
from storage.files import NewFile, insert_file
from storage.messages import (
    ChatBefore,
    FinishedReply,
    NewTurn,
    chat_for_turn,
    chat_for_turn_query,
    finish_reply,
    insert_turn,
    unstore_turn,
)
from storage.queries import SQL
from storage.usage import UsageEntry, record_usage
from tests.conftest import auth_headers


def owner_of(headers: dict[str, str]) -> Owner:
    import jwt

    claims = jwt.decode(headers["Authorization"].split()[1], options={"verify_signature": False})
    return Owner(claims["org"], claims["sub"])


async def create(client: httpx.AsyncClient, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    response = await client.post("/v1/chats", headers=headers, json=body)
    assert response.status_code == 201, response.text
    return response.json()


async def add_turn(db: Pool, headers: dict[str, str], chat_id: str, text: str) -> None:
    turn = NewTurn(uuid.UUID(chat_id), uuid.uuid4(), uuid.uuid4(), text, text[:80], "fake/echo", [], None, {})
    assert await insert_turn(db, owner_of(headers), turn)


async def snapshot(db: Pool, headers: dict[str, str]) -> list[Any]:
    owner = owner_of(headers)
    chats = await db.fetch(
        "SELECT * FROM chats WHERE org_id = $1 AND user_id = $2 ORDER BY id", owner.org_id, owner.user_id
    )
    messages = await db.fetch(
        "SELECT * FROM messages WHERE org_id = $1 AND user_id = $2 ORDER BY seq", owner.org_id, owner.user_id
    )
    return [dict(row) for row in chats] + [dict(row) for row in messages]


async def test_crud_cycle(client: httpx.AsyncClient, alice: dict[str, str]) -> None:
    chat = await create(client, alice, title="Trip plans", system_prompt="Be brief", metadata={"tag": "x"})
    assert chat["title"] == "Trip plans"
    assert chat["model"] == "fake/echo"
    assert chat["deleted_at"] is None

    read = (await client.get(f"/v1/chats/{chat['id']}", headers=alice)).json()
    assert read["messages"] == [] and read["message_count"] == 0
    assert read["metadata"] == {"tag": "x"}

    patched = await client.patch(
        f"/v1/chats/{chat['id']}", headers=alice, json={"title": "Holiday", "system_prompt": None}
    )
    assert patched.status_code == 200
    assert patched.json()["title"] == "Holiday"
    assert patched.json()["system_prompt"] is None
    assert patched.json()["metadata"] == {"tag": "x"}
    assert patched.json()["updated_at"] > chat["updated_at"]

    assert (await client.delete(f"/v1/chats/{chat['id']}", headers=alice)).status_code == 204
    assert (await client.get(f"/v1/chats/{chat['id']}", headers=alice)).status_code == 404
    trash = (await client.get("/v1/chats?deleted=true", headers=alice)).json()
    assert [c["id"] for c in trash["items"]] == [chat["id"]]
    assert trash["items"][0]["deleted_at"] is not None

    restored = await client.post(f"/v1/chats/{chat['id']}/restore", headers=alice)
    assert restored.status_code == 200
    assert restored.json()["deleted_at"] is None
    assert (await client.get(f"/v1/chats/{chat['id']}", headers=alice)).status_code == 200


async def test_pagination_edges(client: httpx.AsyncClient, alice: dict[str, str]) -> None:
    ids = [(await create(client, alice, title=f"chat {n}"))["id"] for n in range(5)]
    first = (await client.get("/v1/chats?limit=1", headers=alice)).json()
    assert first["total"] == 5 and first["limit"] == 1 and first["offset"] == 0
    assert [c["id"] for c in first["items"]] == [ids[-1]]
    middle = (await client.get("/v1/chats?limit=2&offset=2", headers=alice)).json()
    assert [c["id"] for c in middle["items"]] == [ids[2], ids[1]]
    past = (await client.get("/v1/chats?limit=10&offset=50", headers=alice)).json()
    assert past["items"] == [] and past["total"] == 5
    last = (await client.get("/v1/chats?limit=100&offset=4", headers=alice)).json()
    assert [c["id"] for c in last["items"]] == [ids[0]]


async def test_list_orders_by_recent_activity(
    client: httpx.AsyncClient, alice: dict[str, str], db: Pool
) -> None:
    older = await create(client, alice, title="older")
    newer = await create(client, alice, title="newer")
    await add_turn(db, alice, older["id"], "a new message moves this chat to the top")
    items = (await client.get("/v1/chats", headers=alice)).json()["items"]
    assert [c["id"] for c in items] == [older["id"], newer["id"]]


async def test_search_finds_a_word_in_the_middle_of_a_title(
    client: httpx.AsyncClient, alice: dict[str, str]
) -> None:
    hit = await create(client, alice, title="Notes on PostgreSQL indexing tricks")
    await create(client, alice, title="Grocery list")
    for query in ("indexing", "INDEX", "postgresql tricks", "tri"):
        found = (await client.get("/v1/chats", params={"q": query}, headers=alice)).json()
        assert [c["id"] for c in found["items"]] == [hit["id"]], query
        assert found["total"] == 1
    assert (await client.get("/v1/chats?q=nothing", headers=alice)).json()["total"] == 0
    assert (await client.get("/v1/chats?q=100%25_%27", headers=alice)).status_code == 200


async def test_soft_delete_hides_messages_and_restore_brings_them_back(
    client: httpx.AsyncClient, alice: dict[str, str], db: Pool
) -> None:
    chat = await create(client, alice)
    await add_turn(db, alice, chat["id"], "first question")
    await add_turn(db, alice, chat["id"], "second question")
    before = (await client.get(f"/v1/chats/{chat['id']}", headers=alice)).json()
    assert before["message_count"] == 4
    assert before["title"] == "first question"
    assert (await client.delete(f"/v1/chats/{chat['id']}", headers=alice)).status_code == 204
    assert (await client.get(f"/v1/chats/{chat['id']}/messages", headers=alice)).status_code == 404
    assert (await client.get("/v1/stats", headers=alice)).json()["total_messages"] == 0
    await client.post(f"/v1/chats/{chat['id']}/restore", headers=alice)
    after = (await client.get(f"/v1/chats/{chat['id']}/messages", headers=alice)).json()
    assert [m["id"] for m in after["items"]] == [m["id"] for m in before["messages"]]


async def test_message_pages_and_order(
    client: httpx.AsyncClient, alice: dict[str, str], db: Pool
) -> None:
    chat = await create(client, alice)
    for n in range(3):
        await add_turn(db, alice, chat["id"], f"question {n}")
    asc = (await client.get(f"/v1/chats/{chat['id']}/messages?limit=2&offset=1", headers=alice)).json()
    assert asc["total"] == 6
    assert [(m["role"], m["content"]) for m in asc["items"]] == [("assistant", ""), ("user", "question 1")]
    desc = (await client.get(f"/v1/chats/{chat['id']}/messages?order=desc&limit=1", headers=alice)).json()
    assert desc["items"][0]["role"] == "assistant" and desc["items"][0]["status"] == "streaming"
    read = (await client.get(f"/v1/chats/{chat['id']}?message_limit=1&order=desc", headers=alice)).json()
    assert read["message_count"] == 6 and len(read["messages"]) == 1


async def test_permanent_delete_cascades(
    client: httpx.AsyncClient, alice: dict[str, str], db: Pool
) -> None:
    chat = await create(client, alice)
    await add_turn(db, alice, chat["id"], "to be erased")
    response = await client.delete(f"/v1/chats/{chat['id']}?permanent=true", headers=alice)
    assert response.status_code == 204
    assert await db.fetchval("SELECT count(*) FROM messages WHERE chat_id = $1", uuid.UUID(chat["id"])) == 0
    assert (await client.get("/v1/chats?deleted=true", headers=alice)).json()["total"] == 0


async def test_stats_count_the_callers_chats(
    client: httpx.AsyncClient, alice: dict[str, str], db: Pool
) -> None:
    keep = await create(client, alice)
    gone = await create(client, alice)
    await add_turn(db, alice, keep["id"], "hello")
    await client.delete(f"/v1/chats/{gone['id']}", headers=alice)
    stats = (await client.get("/v1/stats", headers=alice)).json()
    assert stats == {
        "total_chats": 2,
        "active_chats": 1,
        "deleted_chats": 1,
        "total_messages": 2,
        "total_tokens": 0,
    }


def _requests(chat_id: str) -> list[tuple[str, str, dict[str, Any] | None]]:
    return [
        ("GET", f"/v1/chats/{chat_id}", None),
        ("GET", f"/v1/chats/{chat_id}/messages", None),
        ("PATCH", f"/v1/chats/{chat_id}", {"title": "stolen"}),
        ("DELETE", f"/v1/chats/{chat_id}", None),
        ("DELETE", f"/v1/chats/{chat_id}?permanent=true", None),
        ("POST", f"/v1/chats/{chat_id}/restore", None),
    ]


@pytest.mark.parametrize("intruder", ["same-org", "other-org"])
async def test_other_users_see_nothing(
    client: httpx.AsyncClient, alice: dict[str, str], db: Pool, intruder: str
) -> None:
    chat = await create(client, alice, title="private plans")
    await add_turn(db, alice, chat["id"], "secret")
    owner = owner_of(alice)
    org = owner.org_id if intruder == "same-org" else f"org-{uuid.uuid4().hex[:8]}"
    mallory = auth_headers(owner.user_id if intruder == "other-org" else "mallory", org)
    before = await snapshot(db, alice)
    for method, path, body in _requests(chat["id"]):
        response = await client.request(method, path, headers=mallory, json=body)
        assert response.status_code == 404, (method, path)
        assert response.json()["error"]["code"] == "chat_not_found"
    assert (await client.get("/v1/chats?q=private", headers=mallory)).json()["total"] == 0
    assert (await client.get("/v1/chats?deleted=true", headers=mallory)).json()["total"] == 0
    assert (await client.get("/v1/stats", headers=mallory)).json()["total_chats"] == 0
    assert await snapshot(db, alice) == before


async def test_deleted_chat_is_isolated_from_restore_by_others(
    client: httpx.AsyncClient, alice: dict[str, str]
) -> None:
    chat = await create(client, alice)
    await client.delete(f"/v1/chats/{chat['id']}", headers=alice)
    other = auth_headers("mallory", owner_of(alice).org_id)
    assert (await client.post(f"/v1/chats/{chat['id']}/restore", headers=other)).status_code == 404
    assert (await client.get("/v1/chats?deleted=true", headers=alice)).json()["total"] == 1


@pytest.mark.parametrize(
    ("method", "path", "content", "status"),
    [
        ("POST", "/v1/chats", b'{"title": ""}', 422),
        ("POST", "/v1/chats", b'{"title": "' + b"x" * 201 + b'"}', 422),
        ("POST", "/v1/chats", b'{"system_prompt": "' + b"x" * 20_001 + b'"}', 422),
        ("POST", "/v1/chats", b'{"metadata": {"k": "' + b"x" * 17_000 + b'"}}', 422),
        ("POST", "/v1/chats", b'{"title": 7}', 422),
        ("POST", "/v1/chats", b'{"metadata": []}', 422),
        ("POST", "/v1/chats", b'{"model": "no-provider"}', 422),
        ("POST", "/v1/chats", b'{"colour": "red"}', 422),
        ("POST", "/v1/chats", b"{not json", 422),
        ("POST", "/v1/chats", b"[1, 2]", 422),
        ("POST", "/v1/chats", b'{"title": "' + b"x" * 2_000_000 + b'"}', 413),
        ("PATCH", "/v1/chats/{id}", b'{"title": ""}', 422),
        ("PATCH", "/v1/chats/{id}", b'{"unknown": 1}', 422),
        ("PATCH", "/v1/chats/{id}", b"nope", 422),
        ("GET", "/v1/chats/not-a-uuid", b"", 404),
        ("PATCH", "/v1/chats/not-a-uuid", b'{"title": "x"}', 404),
        ("GET", "/v1/chats?limit=0", b"", 422),
        ("GET", "/v1/chats?limit=101", b"", 422),
        ("GET", "/v1/chats?offset=-1", b"", 422),
        ("GET", "/v1/chats?limit=abc", b"", 422),
        ("GET", "/v1/chats/{id}/messages?order=sideways", b"", 422),
        ("DELETE", "/v1/chats/{id}?permanent=maybe", b"", 422),
    ],
)
async def test_bad_input_gets_an_envelope_and_changes_nothing(
    client: httpx.AsyncClient,
    alice: dict[str, str],
    db: Pool,
    method: str,
    path: str,
    content: bytes,
    status: int,
) -> None:
    chat = await create(client, alice, title="untouched")
    before = await snapshot(db, alice)
    response = await client.request(
        method,
        path.replace("{id}", chat["id"]),
        headers={**alice, "Content-Type": "application/json"},
        content=content,
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["status"] == status and error["request_id"]
    if status == 422:
        assert error["code"] == "validation_error"
    assert await snapshot(db, alice) == before


async def test_validation_error_lists_details(client: httpx.AsyncClient, alice: dict[str, str]) -> None:
    response = await client.post("/v1/chats", headers=alice, json={"title": 5, "extra": True})
    details = response.json()["error"]["details"]
    assert {tuple(d["loc"]) for d in details} == {("title",), ("extra",)}


async def test_chat_cap_answers_chat_limit_reached(start_gateway: Any) -> None:
    headers = auth_headers(f"capped-{uuid.uuid4().hex[:6]}", "org-cap")
    async with start_gateway(max_chats_per_user=2) as capped, httpx.AsyncClient(base_url=capped.url) as http:
        first = (await http.post("/v1/chats", headers=headers, json={})).json()
        await http.post("/v1/chats", headers=headers, json={})
        refused = await http.post("/v1/chats", headers=headers, json={})
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "chat_limit_reached"
        await http.delete(f"/v1/chats/{first['id']}", headers=headers)
        assert (await http.post("/v1/chats", headers=headers, json={})).status_code == 201
        assert (await http.post(f"/v1/chats/{first['id']}/restore", headers=headers)).status_code == 403


@pytest.mark.parametrize(
    ("query", "args", "index"),
    [
        ("list_messages_asc", (uuid.uuid4(), "o", "u", 100, 0), "messages_chat_seq"),
        ("list_messages_desc", (uuid.uuid4(), "o", "u", 100, 0), "messages_chat_seq"),
        ("shared_chat", (secrets.token_urlsafe(16),), "chats_share_id"),  # a share link's read
    ],
)
async def test_page_queries_use_their_indexes(
    db: Pool, query: str, args: tuple[Any, ...], index: str
) -> None:
    async with db.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")
        plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {SQL[query]}", *args)
    assert index in str(plan)


async def test_title_search_can_use_its_index(db: Pool) -> None:
    query = (
        "SELECT id FROM chats WHERE to_tsvector('simple', COALESCE(title, '')) @@ to_tsquery('simple', $1)"
    )
    async with db.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")
        plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {query}", "'word':*")
    assert "chats_title_search" in str(plan)


def plan_nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [node, *(child for sub in node.get("Plans", []) for child in plan_nodes(sub))]


async def test_history_read_of_a_long_chat_stops_at_its_limit(db: Pool) -> None:
    owner = Owner("org-long", f"long-{uuid.uuid4().hex[:6]}")
    # Statistics of a server where most chats are short; then one chat of 400 messages.
    await db.execute(
        "WITH c AS (INSERT INTO chats (id, org_id, user_id, model) SELECT gen_random_uuid(), $1, $2, 'fake/echo'"
        " FROM generate_series(1, 400) RETURNING id)"
        " INSERT INTO messages (id, chat_id, org_id, user_id, role, content, parts, status)"
        " SELECT gen_random_uuid(), c.id, $1, $2, 'user', 'short', '[]', 'complete' FROM c, generate_series(1, 10)",
        owner.org_id, owner.user_id)
    chat = await create_chat(db, owner, ChatFields(None, "fake/echo", None), None)
    for n in range(200):
        await insert_turn(db, owner, NewTurn(chat["id"], uuid.uuid4(), uuid.uuid4(), f"message {n}", "t",
                                             "fake/echo", [], None, {}))
    await db.execute("ANALYZE messages")
    async with db.acquire() as conn:
        plan = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {chat_for_turn_query(20)}",
                                   chat["id"], owner.org_id, owner.user_id, None, uuid.uuid4())
    scans = [node for node in plan_nodes(plan[0]["Plan"]) if node.get("Relation Name") == "messages"]
    assert scans and all(node["Actual Rows"] <= 20 for node in scans), [node["Node Type"] for node in scans]


async def test_a_turn_written_before_its_read_is_not_its_own_history_and_is_taken_back_whole(db: Pool) -> None:
    owner = Owner("org-undo", f"undo-{uuid.uuid4().hex[:6]}")
    chat = await create_chat(db, owner, ChatFields(None, "fake/echo", None), None)
    before = dict(await db.fetchrow("SELECT * FROM chats WHERE id = $1", chat["id"]))
    turn = NewTurn(chat["id"], uuid.uuid4(), uuid.uuid4(), "early", "early", "fake/echo", [], "c-1", {})
    stored = await insert_turn(db, owner, turn)
    assert stored == ChatBefore(before["updated_at"], None)
    # The turn's own read, done after its write: its message is neither history nor a duplicate of itself.
    context = await chat_for_turn(db, owner, chat["id"], 20, "c-1", turn.user_message_id)
    assert context is not None and context.history == [] and not context.duplicate
    seen_by_another = await chat_for_turn(db, owner, chat["id"], 20, "c-1", uuid.uuid4())
    assert seen_by_another is not None and seen_by_another.duplicate
    assert seen_by_another.history == [("user", "early", None, None)]
    assert (await db.fetchrow("SELECT title FROM chats WHERE id = $1", chat["id"]))["title"] == "early"

    await unstore_turn(db, owner, turn, stored)
    assert dict(await db.fetchrow("SELECT * FROM chats WHERE id = $1", chat["id"])) == before
    assert await db.fetchval("SELECT count(*) FROM messages WHERE chat_id = $1", chat["id"]) == 0


async def test_taking_a_turn_back_leaves_a_chat_moved_since_as_it_is(db: Pool) -> None:
    owner = Owner("org-undo", f"undo-{uuid.uuid4().hex[:6]}")
    chat = await create_chat(db, owner, ChatFields(None, "fake/echo", None), None)
    first, second = (NewTurn(chat["id"], uuid.uuid4(), uuid.uuid4(), text, text, "fake/echo", [], None, {})
                     for text in ("first", "second"))
    stored = await insert_turn(db, owner, first)
    assert stored is not None and await insert_turn(db, owner, second)
    moved = dict(await db.fetchrow("SELECT * FROM chats WHERE id = $1", chat["id"]))
    await unstore_turn(db, owner, first, stored)
    assert dict(await db.fetchrow("SELECT * FROM chats WHERE id = $1", chat["id"])) == moved
    rows = await db.fetch("SELECT id FROM messages WHERE chat_id = $1 ORDER BY seq", chat["id"])
    assert [row["id"] for row in rows] == [second.user_message_id, second.assistant_message_id]


async def test_a_turns_statements_are_planned_once_per_connection(db: Pool) -> None:
    # PostgreSQL plans a prepared statement afresh on every call while its generic plan looks costlier
    # than a custom one; the history read did so with its limit as a parameter (half its time planning).
    # Each turn runs these three once (checkpoints are one statement an interval for all streams).
    owner = Owner("org-plans", f"plans-{uuid.uuid4().hex[:6]}")
    chat = await create_chat(db, owner, ChatFields(None, "fake/echo", None), None)
    async with db.acquire() as conn:
        for n in range(8):
            turn = NewTurn(chat["id"], uuid.uuid4(), uuid.uuid4(), f"message {n}", "t", "fake/echo", [], None, {})
            assert await chat_for_turn(conn, owner, chat["id"], 20, None, turn.user_message_id) is not None
            assert await insert_turn(conn, owner, turn)
            await finish_reply(conn, FinishedReply(turn.assistant_message_id, "partial reply", "complete", "stop",
                                                   "fake/echo", 1, 2, False, {}, 3))
        rows = await conn.fetch("SELECT statement, generic_plans FROM pg_prepared_statements")
    statements = {chat_for_turn_query(20): "chat_for_turn", SQL["insert_turn"]: "insert_turn",
                  SQL["finish_message"]: "finish_message"}
    generic = {statements[row["statement"]]: row["generic_plans"] for row in rows if row["statement"] in statements}
    assert sorted(generic) == sorted(statements.values())
    assert all(count > 0 for count in generic.values()), generic


async def test_erasing_an_org_takes_its_chats_messages_files_and_ledger_and_nothing_else(db: Pool) -> None:
    gone, kept = (Owner(f"org-{uuid.uuid4().hex[:6]}", "same-user") for _ in range(2))
    for owner in (gone, kept):
        await insert_file(db, owner, NewFile("a.txt", "text/plain", bytearray(b"hello"), "0" * 64), None)
        for n in range(2):
            chat = await create_chat(db, owner, ChatFields(None, "fake/echo", None), None)
            turn = NewTurn(chat["id"], uuid.uuid4(), uuid.uuid4(), f"message {n}", "t", "fake/echo", [], None, {})
            assert await insert_turn(db, owner, turn)
            await record_usage(db, UsageEntry(owner.org_id, owner.user_id, chat["id"], turn.assistant_message_id,
                                              "fake/echo", 1, 2, 3, False))

    async def rows(owner: Owner) -> list[int]:
        return [await db.fetchval(f"SELECT count(*) FROM {table} WHERE org_id = $1", owner.org_id)
                for table in ("chats", "messages", "usage_ledger", "files")]

    assert await rows(gone) == await rows(kept) == [2, 4, 2, 1]
    await erase_org(db, gone.org_id)
    assert await rows(gone) == [0, 0, 0, 0]
    assert await rows(kept) == [2, 4, 2, 1]


async def test_a_refused_first_turns_chat_is_taken_back_only_while_empty_and_as_it_was_made(db: Pool) -> None:
    owner = Owner(f"org-{uuid.uuid4().hex[:6]}", "first-turn")
    made = await create_chat(db, owner, ChatFields(None, "fake/echo", None), None)
    # Another request's turn stored in it moves it (and leaves a message): the refused one leaves it alone.
    turn = NewTurn(made["id"], uuid.uuid4(), uuid.uuid4(), "theirs", "t", "fake/echo", [], None, {})
    assert await insert_turn(db, owner, turn)
    assert not await erase_empty_chat(db, owner, made["id"], made["updated_at"])
    # Moved but empty (its turn taken back with the chat left as it was then): still not as it was made.
    await db.execute("DELETE FROM messages WHERE chat_id = $1", made["id"])
    assert not await erase_empty_chat(db, owner, made["id"], made["updated_at"])
    assert await db.fetchval("SELECT count(*) FROM chats WHERE id = $1", made["id"]) == 1
    # As it was made, and empty: erased.
    fresh = await create_chat(db, owner, ChatFields(None, "fake/echo", None), None)
    assert await erase_empty_chat(db, owner, fresh["id"], fresh["updated_at"])
    assert await db.fetchval("SELECT count(*) FROM chats WHERE id = $1", fresh["id"]) == 0
