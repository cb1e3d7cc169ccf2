"""GET /v1/chats over real HTTP and PostgreSQL: its filters, walks with a cursor that list each chat once while
chats change under them, its refusals, and the plans of its queries.

Past 400 lines because the cursor's exactly-once walk needs chats changing under it, for each filter.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from gateway.api.cursors import write_cursor
from storage.chats import (
    ChatFilter,
    ListKind,
    Owner,
    WalkPoint,
    listing_args,
    listing_query,
    prune_chat_moves,
)
from storage.db import Pool
from tests.api.test_send import eventually, new_chat, next_delta, read_events
from tests.conftest import auth_headers

JSON = {"Accept": "application/json"}
# A reply that streams for a minute, unless stopped.
LONG = "fake/echo?tokens=3000&gap_ms=20"


def day(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@dataclass(frozen=True)
class Shelf:
    """Chats of two members of one org, by name, with known times, models, titles and visibility."""

    alice: dict[str, str]
    bob: dict[str, str]
    ids: dict[str, str]

    def names(self, ids: list[str]) -> list[str]:
        by_id = {chat_id: name for name, chat_id in self.ids.items()}
        return [by_id.get(chat_id, chat_id) for chat_id in ids]


# name: owner, title, model, visibility, created, updated, deleted
CHATS: dict[str, tuple[str, str, str, str, str, str, str | None]] = {
    "plan": ("alice", "Trip plans", "fake/echo", "private", "2025-01-01T12:00", "2025-01-10", None),
    "notes": ("alice", "Meeting notes", "fake/other", "org", "2025-01-05", "2025-02-01", None),
    "draft": ("alice", "Draft plans", "fake/other", "private", "2025-01-20", "2025-01-25", None),
    "recipe": ("alice", "Recipe", "fake/echo", "public", "2025-02-01", "2025-03-01", None),
    "old": ("alice", "Old trip", "fake/echo", "private", "2024-12-01", "2024-12-02", "2025-02-15"),
    "gone": ("alice", "Gone notes", "fake/other", "private", "2025-01-02", "2025-01-03", "2025-03-05"),
    "bobs": ("bob", "Bob plans", "fake/other", "org", "2025-01-15", "2025-02-10", None),
    "hidden": ("bob", "Bob private plans", "fake/echo", "private", "2025-01-16", "2025-02-11", None),
}
STREAMING = ("draft", "recipe")

CASES: list[tuple[str, list[str]]] = [
    ("", ["recipe", "notes", "draft", "plan"]),
    ("status=active", ["recipe", "notes", "draft", "plan"]),
    ("model=fake/echo", ["recipe", "plan"]),
    ("created_after=2025-01-05", ["recipe", "draft"]),  # notes, created at that very moment, is not after it
    ("created_before=2025-01-05", ["plan"]),
    ("created_after=2025-01-01&created_before=2025-02-01", ["notes", "draft", "plan"]),
    ("created_after=2025-01-01T12:00:00Z&created_before=2025-02-01T00:00:00.000001Z", ["recipe", "notes", "draft"]),
    ("updated_after=2025-01-20T00:00:00Z", ["recipe", "notes", "draft"]),
    ("updated_before=2025-01-25", ["plan"]),
    ("updated_after=2025-01-01&updated_before=2025-02-01T00:00:00%2B01:00", ["draft", "plan"]),
    ("status=deleted", ["gone", "old"]),
    ("deleted=true", ["gone", "old"]),
    ("deleted=true&status=deleted", ["gone", "old"]),
    ("status=deleted&q=trip", ["old"]),
    ("status=deleted&updated_before=2025-01-01", ["old"]),
    ("status=all", ["recipe", "notes", "draft", "plan", "gone", "old"]),
    ("status=all&model=fake/other", ["notes", "draft", "gone"]),
    ("status=all&created_before=2025-01-03", ["plan", "gone", "old"]),
    ("status=all&q=notes", ["notes", "gone"]),
    ("streaming=true", ["recipe", "draft"]),
    ("streaming=false", ["notes", "plan"]),
    ("streaming=true&q=plans", ["draft"]),
    ("streaming=true&model=fake/other&created_after=2025-01-10", ["draft"]),
    ("status=all&streaming=false&created_after=2025-01-01", ["notes", "plan", "gone"]),
    ("q=plans", ["draft", "plan"]),
    ("q=plans&model=fake/echo", ["plan"]),
    ("q=plans&updated_after=2025-01-20&streaming=false", []),
    ("scope=org", ["recipe", "bobs", "notes"]),
    ("scope=org&status=active&q=plans", ["bobs"]),
    ("scope=org&streaming=true", ["recipe"]),
    ("scope=org&model=fake/other&created_after=2025-01-10", ["bobs"]),
    ("scope=org&updated_before=2025-02-10T00:00:00Z", ["notes"]),
]


async def listing(client: httpx.AsyncClient, headers: dict[str, str], query: str) -> dict[str, Any]:
    response = await client.get(f"/v1/chats?{query}", headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def walk(client: httpx.AsyncClient, headers: dict[str, str], query: str, limit: int) -> list[str]:
    """Every chat of a listing, page after page by cursor."""
    page = await listing(client, headers, f"{query}&limit={limit}")
    ids = [item["id"] for item in page["items"]]
    while page["next_cursor"] is not None:
        assert len(page["items"]) == limit
        page = await listing(client, headers, f"{query}&limit={limit}&cursor={page['next_cursor']}")
        assert page["offset"] is None
        ids += [item["id"] for item in page["items"]]
    return ids


async def place(db: Pool, chat_id: str, created: str, updated: str, deleted: str | None) -> None:
    await db.execute("UPDATE chats SET created_at = $2, updated_at = $3, deleted_at = $4 WHERE id = $1",
                     uuid.UUID(chat_id), day(created), day(updated), deleted and day(deleted))


@contextlib.asynccontextmanager
async def shelf(client: httpx.AsyncClient, db: Pool) -> AsyncIterator[Shelf]:
    """The chats of CHATS, those of STREAMING with a reply streaming while the shelf is open."""
    org = f"org-{uuid.uuid4().hex[:8]}"
    people = {name: auth_headers(f"{name}-{uuid.uuid4().hex[:6]}", org) for name in ("alice", "bob")}
    ids = {name: await new_chat(client, people[owner], title=title, model=model, visibility=visibility)
           for name, (owner, title, model, visibility, *_) in CHATS.items()}
    async with contextlib.AsyncExitStack() as streams:
        running = []  # held, so that the streams stay open (see next_delta)
        for name in STREAMING:
            response = await streams.enter_async_context(client.stream(
                "POST", f"/v1/chats/{ids[name]}/messages", headers=people["alice"],
                json={"content": "go", "model": LONG}))
            running.append(read_events(response))
            await next_delta(running[-1])
        for name, (*_, created, updated, deleted) in CHATS.items():
            await place(db, ids[name], created, updated, deleted)
        yield Shelf(people["alice"], people["bob"], ids)
        for name in STREAMING:
            await client.post(f"/v1/chats/{ids[name]}/stop", headers=people["alice"])


async def test_filters_list_exactly_their_chats_by_offset_and_by_cursor(
    client: httpx.AsyncClient, db: Pool
) -> None:
    async with shelf(client, db) as chats:
        for query, expected in CASES:
            page = await listing(client, chats.alice, query)
            assert chats.names([item["id"] for item in page["items"]]) == expected, query
            assert page["total"] == len(expected) and page["next_cursor"] is None, query
            assert chats.names(await walk(client, chats.alice, query, 1)) == expected, query
            assert chats.names(await walk(client, chats.alice, query, 2)) == expected, query
            second = await listing(client, chats.alice, f"{query}&limit=2&offset=1")
            assert chats.names([item["id"] for item in second["items"]]) == expected[1:3], query
        bob = await listing(client, chats.bob, "scope=org&streaming=true")
        assert [item["id"] for item in bob["items"]] == [chats.ids["recipe"]] and "share_id" not in bob["items"][0]
    # Stopped, the replies no longer stream.
    await eventually(lambda: no_chat(client, chats.alice, "streaming=true"))


async def no_chat(client: httpx.AsyncClient, headers: dict[str, str], query: str) -> bool:
    return (await listing(client, headers, query))["total"] == 0


@dataclass
class Churn:
    """Writes to a user's chats while a walk runs through them: each round sends a message to a chat the walk
    has not listed yet (which moves it to the front, before the walk's position), renames a chat and creates
    one. ``progressed`` is set after each round."""

    client: httpx.AsyncClient
    headers: dict[str, str]
    order: list[str]
    listed: set[str]
    rounds: int = 0
    progressed: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, stop: asyncio.Event) -> None:
        pick = random.Random(7)
        while not stop.is_set():
            ahead = [chat_id for chat_id in self.order if chat_id not in self.listed]
            if ahead:
                await self.send(pick.choice(ahead))
            await self.rename(pick.choice(self.order), f"renamed {self.rounds}")
            await new_chat(self.client, self.headers, title=f"new {self.rounds}")
            self.rounds += 1
            self.progressed.set()

    async def send(self, chat_id: str) -> None:
        response = await self.client.post(f"/v1/chats/{chat_id}/messages", headers={**self.headers, **JSON},
                                          json={"content": "touch"})
        assert response.status_code == 200, response.text

    async def rename(self, chat_id: str, title: str) -> None:
        response = await self.client.patch(f"/v1/chats/{chat_id}", headers=self.headers, json={"title": title})
        assert response.status_code == 200, response.text


async def test_a_cursor_walk_lists_each_chat_once_while_chats_are_created_and_touched(
    client: httpx.AsyncClient, alice: dict[str, str]
) -> None:
    for n in range(250):
        await new_chat(client, alice, title=f"chat {n}")
    order = [item["id"] for offset in (0, 100, 200)
             for item in (await listing(client, alice, f"limit=100&offset={offset}"))["items"]]
    page = await listing(client, alice, "limit=10")
    listed = [item["id"] for item in page["items"]]
    churn, stop = Churn(client, alice, order, set(listed)), asyncio.Event()
    writes = asyncio.create_task(churn.run(stop))
    pages = 1
    while page["next_cursor"] is not None:
        churn.progressed.clear()
        await churn.progressed.wait()  # at least a round of writes between any two pages, more during them
        page = await listing(client, alice, f"limit=10&cursor={page['next_cursor']}")
        listed += [item["id"] for item in page["items"]]
        churn.listed.update(listed)
        pages += 1
    stop.set()
    await writes
    assert listed == order  # each chat once, in the order of the first page, none of the new ones
    assert pages == 25 and churn.rounds >= 24
    assert (await listing(client, alice, "limit=1"))["total"] == 250 + churn.rounds


async def test_a_trash_walk_lists_a_chat_deleted_again_at_its_first_place(
    client: httpx.AsyncClient, alice: dict[str, str]
) -> None:
    ids = [await new_chat(client, alice) for _ in range(6)]
    for chat_id in ids:
        assert (await client.delete(f"/v1/chats/{chat_id}", headers=alice)).status_code == 204
    trash = ids[::-1]
    page = await listing(client, alice, "status=deleted&limit=2")
    walked = [item["id"] for item in page["items"]]
    again, restored = trash[5], trash[3]  # neither listed yet
    for chat_id in (again, restored):
        assert (await client.post(f"/v1/chats/{chat_id}/restore", headers=alice)).status_code == 200
    assert (await client.delete(f"/v1/chats/{again}", headers=alice)).status_code == 204
    while page["next_cursor"] is not None:
        page = await listing(client, alice, f"status=deleted&limit=2&cursor={page['next_cursor']}")
        walked += [item["id"] for item in page["items"]]
    assert walked == [chat_id for chat_id in trash if chat_id != restored]
    assert [item["id"] for item in (await listing(client, alice, "status=deleted&limit=1"))["items"]] == [again]


def cursor_of(**fields: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(fields).encode()).decode().rstrip("=")


VALID = {"f": "0" * 16, "s": "10:20:15", "t": 1, "k": 1, "i": uuid.UUID(int=1).hex}


@pytest.mark.parametrize(
    ("query", "loc", "kind"),
    [
        ("cursor=not-a-cursor", ["cursor"], "cursor_malformed"),
        ("cursor=%21%21%21", ["cursor"], "cursor_malformed"),
        (f"cursor={cursor_of(a=1)}", ["cursor"], "cursor_malformed"),
        (f"cursor={cursor_of(**{**VALID, 's': '20:10:'})}", ["cursor"], "cursor_malformed"),
        (f"cursor={cursor_of(**{**VALID, 's': '10:20:25'})}", ["cursor"], "cursor_malformed"),
        (f"cursor={cursor_of(**{**VALID, 's': '0:20:'})}", ["cursor"], "cursor_malformed"),
        (f"cursor={cursor_of(**{**VALID, 's': '10:20:16,15'})}", ["cursor"], "cursor_malformed"),
        (f"cursor={cursor_of(**{**VALID, 's': '10:99999999999999999999:'})}", ["cursor"], "cursor_malformed"),
        (f"cursor={cursor_of(**{**VALID, 'k': 10**18})}", ["cursor"], "cursor_malformed"),
        (f"cursor={cursor_of(**{**VALID, 't': True})}", ["cursor"], "cursor_malformed"),
        (f"cursor={cursor_of(**{**VALID, 'i': 'chat'})}", ["cursor"], "cursor_malformed"),
        ("cursor=" + "A" * 8193, ["cursor"], "string_too_long"),
        ("created_after=yesterday", ["created_after"], "value_error"),
        ("created_before=2025-13-01", ["created_before"], "value_error"),
        ("updated_after=2025-01-01T00:00:00", ["updated_after"], "value_error"),
        ("updated_before=2025-01-01T00:00:00+01:00", ["updated_before"], "value_error"),  # an unescaped +
        ("status=archived", ["status"], "literal_error"),
        ("streaming=maybe", ["streaming"], "bool_parsing"),
        ("deleted=true&status=active", [], "value_error"),
        ("scope=org&status=all", [], "value_error"),
        ("scope=org&deleted=true", [], "value_error"),
        ("offset=99999999999999999999", ["offset"], "less_than_equal"),
        ("limit=0", ["limit"], "greater_than_equal"),
        ("model=" + "m" * 201, ["model"], "string_too_long"),
    ],
)
async def test_bad_listing_queries_are_422(
    client: httpx.AsyncClient, alice: dict[str, str], query: str, loc: list[str], kind: str
) -> None:
    await new_chat(client, alice)
    details = await refusal(client, alice, query)
    assert [(detail["loc"], detail["type"]) for detail in details] == [(loc, kind)]


async def refusal(client: httpx.AsyncClient, headers: dict[str, str], query: str) -> list[dict[str, Any]]:
    response = await client.get(f"/v1/chats?{query}", headers=headers)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "validation_error"
    details: list[dict[str, Any]] = response.json()["error"]["details"]
    return details


async def test_a_cursor_holds_to_its_filters_and_age_and_never_goes_with_offset(
    client: httpx.AsyncClient, alice: dict[str, str]
) -> None:
    for title in ("plans one", "plans two", "notes"):
        await new_chat(client, alice, title=title)
    cursor = (await listing(client, alice, "q=plans&limit=1"))["next_cursor"]
    assert cursor is not None
    assert len((await listing(client, alice, f"q=plans&limit=5&cursor={cursor}"))["items"]) == 1
    for other in ("q=notes", "", "q=plans&status=all", "q=plans&model=fake/echo", "q=plans&streaming=false",
                  "q=plans&created_after=2025-01-01"):
        details = await refusal(client, alice, f"{other}&cursor={cursor}")
        assert [(detail["loc"], detail["type"]) for detail in details] == [(["cursor"], "cursor_filters_differ")]
    details = await refusal(client, alice, f"q=plans&offset=0&cursor={cursor}")
    assert [detail["loc"] for detail in details] == [[]] and "offset" in details[0]["msg"]
    old = WalkPoint("10:20:", datetime.now(UTC) - timedelta(hours=1, seconds=1), datetime.now(UTC), uuid.uuid4())
    expired = write_cursor(old, ChatFilter(query="plans"))
    assert [d["type"] for d in await refusal(client, alice, f"q=plans&cursor={expired}")] == ["cursor_expired"]


async def test_moves_are_kept_two_hours_and_go_with_their_chat(
    client: httpx.AsyncClient, alice: dict[str, str], db: Pool
) -> None:
    kept, erased = await new_chat(client, alice), await new_chat(client, alice)
    for chat_id in (kept, erased):
        await client.patch(f"/v1/chats/{chat_id}", headers=alice, json={"title": "moved"})
    await db.execute("UPDATE chat_moves SET moved_at = now() - interval '121 minutes' WHERE chat_id = $1",
                     uuid.UUID(kept))
    await client.patch(f"/v1/chats/{kept}", headers=alice, json={"title": "moved again"})
    while await prune_chat_moves(db):  # what the stream registry's maintenance runs, a batch at a time
        pass
    assert await db.fetchval("SELECT count(*) FROM chat_moves WHERE chat_id = $1", uuid.UUID(kept)) == 1
    await client.delete(f"/v1/chats/{erased}?permanent=true", headers=alice)
    assert await db.fetchval("SELECT count(*) FROM chat_moves WHERE chat_id = $1", uuid.UUID(erased)) == 0


# Each filter alone, as $3 to $9 of a listing.
FILTERS: dict[str, ChatFilter] = {
    "none": ChatFilter(),
    "q": ChatFilter(query="plans"),
    "model": ChatFilter(model="fake/other"),
    "created_after": ChatFilter(created_after=day("2025-01-01")),
    "created_before": ChatFilter(created_before=day("2025-01-01")),
    "updated_after": ChatFilter(updated_after=day("2025-01-01")),
    "updated_before": ChatFilter(updated_before=day("2025-01-01")),
    "streaming": ChatFilter(streaming=True),
    "not streaming": ChatFilter(streaming=False),
}
# The index each kind of listing walks for its page.
INDEXES: dict[ListKind, str] = {
    "active": "chats_owner_active", "deleted": "chats_owner_deleted", "all": "chats_owner_updated",
    "org": "chats_org_shared",
}


def sql_literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool | int):
        return str(value).lower()
    return "'" + str(value).replace("'", "''") + "'"


def chats_scans(plan: Any) -> list[tuple[str, str | None]]:
    """The plan's nodes that read chats or an index of it: (node type, index)."""
    nodes, stack = [], [plan[0]["Plan"]]
    while stack:
        node = stack.pop()
        stack.extend(node.get("Plans", []))
        if node.get("Relation Name") == "chats" or node.get("Index Name", "").startswith("chats_"):
            nodes.append((node["Node Type"], node.get("Index Name")))
    return nodes


async def plans(db: Pool, query: str, args: list[Any]) -> list[list[tuple[str, str | None]]]:
    """The custom plan of ``query`` for ``args`` (asyncpg's first executions get one), and its generic plan
    (a prepared statement's later ones may get that)."""
    async with db.acquire() as conn, conn.transaction():
        custom = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {query}", *args)
        await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        await conn.execute(f"PREPARE listing AS {query}")
        generic = await conn.fetchval(
            f"EXPLAIN (FORMAT JSON) EXECUTE listing({', '.join(sql_literal(arg) for arg in args)})")
        await conn.execute("DEALLOCATE listing")
    return [chats_scans(custom), chats_scans(generic)]


async def test_every_filter_of_every_listing_reads_an_index_of_chats(db: Pool) -> None:
    reader = Owner("org-plans-0", f"reader-{uuid.uuid4().hex[:6]}")
    # A few thousand chats of other owners (other members of the reader's org among them), a tenth of them
    # deleted, a quarter shared with their org; then the reader's own.
    await db.execute(
        "INSERT INTO chats (id, org_id, user_id, title, model, visibility, created_at, updated_at, deleted_at)"
        " SELECT gen_random_uuid(), 'org-plans-' || (n % 20), 'member-' || (n % 200), 'chat ' || n,"
        "  CASE WHEN n % 3 = 0 THEN 'fake/other' ELSE 'fake/echo' END,"
        "  CASE WHEN n % 4 = 0 THEN 'org' ELSE 'private' END, now() - n * interval '1 hour',"
        "  now() - n * interval '1 minute', CASE WHEN n % 10 = 0 THEN now() END"
        " FROM generate_series(1, 4000) n")
    await db.execute(
        "INSERT INTO chats (id, org_id, user_id, title, model, deleted_at)"
        " SELECT gen_random_uuid(), $1, $2, 'mine ' || n, 'fake/echo', CASE WHEN n % 5 = 0 THEN now() END"
        " FROM generate_series(1, 30) n", reader.org_id, reader.user_id)
    await db.execute("ANALYZE chats")
    snapshot = await db.fetchval("SELECT pg_current_snapshot()::text")
    templates = {"list_chats": [21, 0], "list_chats_after": [21, snapshot, datetime.now(UTC), uuid.uuid4()]}
    for kind, (name, match), (template, extra) in itertools.product(INDEXES, FILTERS.items(), templates.items()):
        args = [*listing_args(reader, replace(match, kind=kind)), *extra]
        for scans in await plans(db, listing_query(template, kind), args):
            where = (kind, name, template, scans)
            assert scans and not [scan for scan in scans if scan[0] == "Seq Scan"], where
            if name == "none":
                assert INDEXES[kind] in {index for _, index in scans}, where
