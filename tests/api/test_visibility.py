"""Chat visibility and share links over real HTTP, PostgreSQL and Redis: who may read a private, org or public
chat through which route, that nobody but its owner changes it, what a share link shows (and nothing more),
that a dead link stays dead on every instance, and that bad input changes nothing.

Past 400 lines because each visibility is tried through every route that reads a chat.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg
import httpx
import pytest
from playwright.async_api import async_playwright, expect

from gateway.api import openapi
from storage.db import Pool
from tests.api.test_openapi import held
from tests.api.test_page import ARTIFACTS, CHROMIUM, CHROMIUM_FLAGS
from tests.api.test_send import SLOW, new_chat, next_delta, read_events
from tests.conftest import Gateway, auth_headers

JSON = {"Accept": "application/json"}
SHARE_ID = re.compile(r"[A-Za-z0-9_-]{22}")
SECRET_PROMPT = "system-prompt-only-the-org-may-read"
SECRET_METADATA = {"ticket": "metadata-only-the-org-may-read"}
VISIBILITIES = ("private", "org", "public")


@dataclass(frozen=True)
class People:
    """A chat's owner, another member of its org, and a user of another org."""

    owner: dict[str, str]
    member: dict[str, str]
    outsider: dict[str, str]


@pytest.fixture
def people() -> People:
    org, tag = f"org-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:8]
    return People(auth_headers(f"owner-{tag}", org), auth_headers(f"member-{tag}", org),
                  auth_headers(f"outsider-{tag}", f"org-{uuid.uuid4().hex[:8]}"))


@dataclass(frozen=True)
class Chat:
    id: str
    share_id: str  # the link it was given; dead unless the chat is still public


async def chat_of(client: httpx.AsyncClient, people: People, visibility: str) -> Chat:
    """A chat with one turn, shared by link, then given ``visibility``."""
    chat_id = await new_chat(client, people.owner, title="Plans", system_prompt=SECRET_PROMPT,
                             metadata=SECRET_METADATA)
    turn = await client.post(f"/v1/chats/{chat_id}/messages", headers={**people.owner, **JSON},
                             json={"content": "hello there", "metadata": {"client": "secret"}})
    assert turn.status_code == 200, turn.text
    shared = await client.post(f"/v1/chats/{chat_id}/share", headers=people.owner)
    assert shared.status_code == 200, shared.text
    if visibility != "public":
        patched = await client.patch(f"/v1/chats/{chat_id}", headers=people.owner, json={"visibility": visibility})
        assert patched.status_code == 200 and patched.json()["visibility"] == visibility
    return Chat(chat_id, shared.json()["share_id"])


async def snapshot(db: Pool, chat_id: str) -> list[dict[str, Any]]:
    """The chat's row and its messages' rows (but a reply still streaming, which checkpoints change)."""
    chat = await db.fetch("SELECT * FROM chats WHERE id = $1", uuid.UUID(chat_id))
    messages = await db.fetch("SELECT * FROM messages WHERE chat_id = $1 AND status <> 'streaming' ORDER BY seq",
                              uuid.UUID(chat_id))
    return [dict(row) for row in (*chat, *messages)]


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The error envelope without its request id, which differs on every answer."""
    error = dict(response.json()["error"])
    assert error.pop("request_id")
    return error


@dataclass(frozen=True)
class Call:
    """A request; ``{chat}`` and ``{share}`` in its path and body are the chat's id and its share link's."""

    method: str
    path: str
    body: dict[str, Any] | None = None

    async def send(self, client: httpx.AsyncClient, chat: Chat, headers: dict[str, str]) -> httpx.Response:
        def fill(text: str) -> str:
            return text.format(chat=chat.id, share=chat.share_id)

        body = None if self.body is None else {k: fill(v) if isinstance(v, str) else v for k, v in self.body.items()}
        return await client.request(self.method, fill(self.path), headers={**headers, **JSON}, json=body)


# What an actor gets: a status, or one of
#   "missing": 404 exactly like a chat that does not exist;
#   "read": the chat as its org reads it while shared with the org (org, public), else "missing";
#   "listed"/"unlisted": 200 with the chat listed while shared with the org / never;
#   "shared view": the share link's view while the chat is public, else the link's 404.
Outcome = int | Literal["missing", "read", "listed", "unlisted", "shared view"]


@dataclass(frozen=True)
class Row:
    route: str
    call: Call
    by_link: Call  # the same asked by someone holding only the share link: no token, the link's id
    # owner, org member, other org, no token, through the share link
    expect: tuple[Outcome, Outcome, Outcome, Outcome, Outcome]
    before: Literal["deleted", "streaming"] | None = None


MATRIX = [
    Row("GET chat", Call("GET", "/v1/chats/{chat}"), Call("GET", "/v1/shared/{share}"),
        (200, "read", "missing", 401, "shared view")),
    Row("GET messages", Call("GET", "/v1/chats/{chat}/messages"), Call("GET", "/v1/shared/{share}/messages"),
        (200, "read", "missing", 401, 404)),
    Row("PATCH", Call("PATCH", "/v1/chats/{chat}", {"title": "renamed"}),
        Call("PATCH", "/v1/shared/{share}", {"title": "renamed"}), (200, "missing", "missing", 401, 405)),
    Row("DELETE", Call("DELETE", "/v1/chats/{chat}"), Call("DELETE", "/v1/shared/{share}"),
        (204, "missing", "missing", 401, 405)),
    Row("restore", Call("POST", "/v1/chats/{chat}/restore"), Call("POST", "/v1/shared/{share}/restore"),
        (200, "missing", "missing", 401, 404), before="deleted"),
    Row("send", Call("POST", "/v1/chats/{chat}/messages", {"content": "mine now"}),
        Call("POST", "/v1/shared/{share}/messages", {"content": "mine now"}), (200, "missing", "missing", 401, 404)),
    Row("POST /v1/chat", Call("POST", "/v1/chat", {"message": "mine now", "chat_id": "{chat}"}),
        Call("POST", "/v1/chat", {"message": "mine now", "chat_id": "{share}"}), (200, "missing", "missing", 401, 401)),
    Row("stop", Call("POST", "/v1/chats/{chat}/stop"), Call("POST", "/v1/shared/{share}/stop"),
        (200, "missing", "missing", 401, 404), before="streaming"),
    Row("share", Call("POST", "/v1/chats/{chat}/share"), Call("POST", "/v1/shared/{share}"),
        (200, "missing", "missing", 401, 405)),
    Row("unshare", Call("DELETE", "/v1/chats/{chat}/share"), Call("DELETE", "/v1/shared/{share}/share"),
        (204, "missing", "missing", 401, 404)),
    Row("list scope=org", Call("GET", "/v1/chats?scope=org&limit=100"), Call("GET", "/v1/chats?scope=org&limit=100"),
        ("listed", "listed", "unlisted", 401, 401)),
]
ERROR_CODES = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}


@dataclass
class Check:
    """Holds one answer to what the matrix says of it."""

    client: httpx.AsyncClient
    people: People
    chat: Chat
    visibility: str
    missing: dict[str, Any]  # a missing chat's 404, request id apart

    async def __call__(self, row: Row, outcome: Outcome, response: httpx.Response) -> None:
        shared_with_org = self.visibility != "private"
        if outcome == "read" and shared_with_org:
            await self.as_the_owner_reads_it(row, response)
        elif outcome in ("read", "missing"):
            assert response.status_code == 404 and error_of(response) == self.missing, response.text
        elif outcome in ("listed", "unlisted"):
            assert response.status_code == 200, response.text
            listed = self.chat.id in {item["id"] for item in response.json()["items"]}
            assert listed == (outcome == "listed" and shared_with_org)
        elif outcome == "shared view":
            await self.shared_view(response)
        else:
            assert response.status_code == outcome, response.text
            if outcome in ERROR_CODES:
                assert response.json()["error"]["code"] == ERROR_CODES[outcome]

    async def as_the_owner_reads_it(self, row: Row, response: httpx.Response) -> None:
        """A member reads what the owner reads, but the share link."""
        assert response.status_code == 200, response.text
        owners = (await row.call.send(self.client, self.chat, self.people.owner)).json()
        assert "share_id" in owners or "items" in owners
        owners.pop("share_id", None)
        assert "share_id" not in response.json()
        assert response.json() == owners

    async def shared_view(self, response: httpx.Response) -> None:
        if self.visibility != "public":
            assert response.status_code == 404 and error_of(response)["code"] == "shared_chat_not_found"
            return
        assert response.status_code == 200, response.text
        view = response.json()
        assert set(view) == {"title", "messages"}
        assert [set(message) for message in view["messages"]] == [{"role", "content", "parts", "created_at"}] * 2


@pytest.mark.parametrize("visibility", VISIBILITIES)
@pytest.mark.parametrize("row", MATRIX, ids=[row.route for row in MATRIX])
async def test_isolation_matrix(
    client: httpx.AsyncClient, people: People, db: Pool, visibility: str, row: Row
) -> None:
    """Every chat route as the owner, an org member, another org, no token and through the share link: the
    refused change nothing; the owner, asked last, is answered."""
    chat = await chat_of(client, people, visibility)
    missing = error_of(await client.get(f"/v1/chats/{uuid.uuid4()}", headers=people.member))
    check = Check(client, people, chat, visibility, missing)
    async with contextlib.AsyncExitStack() as stack:
        if row.before == "deleted":
            assert (await client.delete(f"/v1/chats/{chat.id}", headers=people.owner)).status_code == 204
        if row.before == "streaming":
            stream = await stack.enter_async_context(client.stream(
                "POST", f"/v1/chats/{chat.id}/messages", headers=people.owner, json={"content": "go", "model": SLOW}))
            events = read_events(stream)
            await next_delta(events)
        before = await snapshot(db, chat.id)
        owner, member, outsider, anonymous, link = row.expect
        for headers, outcome in ((people.member, member), (people.outsider, outsider), ({}, anonymous)):
            await check(row, outcome, await row.call.send(client, chat, headers))
            assert await snapshot(db, chat.id) == before
        await check(row, link, await row.by_link.send(client, chat, {}))
        assert await snapshot(db, chat.id) == before
        await check(row, owner, await row.call.send(client, chat, people.owner))
        if row.before == "streaming":
            ends = [event.json()["finish_reason"] async for event in events if event.event == "done"]
            assert ends == ["cancelled"]


async def test_the_shared_view_holds_nothing_but_the_title_and_the_messages(
    client: httpx.AsyncClient, people: People
) -> None:
    chat = await chat_of(client, people, "public")
    owners = (await client.get(f"/v1/chats/{chat.id}", headers=people.owner)).json()
    response = await client.get(f"/v1/shared/{chat.share_id}")
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    view = response.json()
    assert set(view) == {"title", "messages"}
    assert [set(message) for message in view["messages"]] == [{"role", "content", "parts", "created_at"}] * 2
    shown = ("role", "content", "parts", "created_at")
    assert view == {"title": "Plans",
                    "messages": [{key: message[key] for key in shown} for message in owners["messages"]]}
    hidden = [chat.id, chat.share_id, SECRET_PROMPT, SECRET_METADATA["ticket"], "secret", "fake/echo",
              *owner_claims(people.owner),
              *(message["id"] for message in owners["messages"])]
    assert not [text for text in hidden if text in response.text]


def owner_claims(headers: dict[str, str]) -> tuple[str, str]:
    import jwt

    claims = jwt.decode(headers["Authorization"].split()[1], options={"verify_signature": False})
    return claims["sub"], claims["org"]


async def test_unknown_and_dead_links_answer_the_same_404(
    client: httpx.AsyncClient, people: People, db: Pool
) -> None:
    revoked = await chat_of(client, people, "public")
    assert (await client.delete(f"/v1/chats/{revoked.id}/share", headers=people.owner)).status_code == 204
    deleted = await chat_of(client, people, "public")
    assert (await client.delete(f"/v1/chats/{deleted.id}", headers=people.owner)).status_code == 204
    erased = await chat_of(client, people, "public")
    assert (await client.delete(f"/v1/chats/{erased.id}?permanent=true", headers=people.owner)).status_code == 204
    made_private, made_org = [await chat_of(client, people, visibility) for visibility in ("private", "org")]
    ids = [secrets.token_urlsafe(16), revoked.share_id, deleted.share_id, erased.share_id, made_private.share_id,
           made_org.share_id, revoked.id, "x", "a" * 300, "%00", "~" * 22]
    answers = [await client.get(f"/v1/shared/{share_id}", headers=people.owner) for share_id in ids]
    assert {response.status_code for response in answers} == {404}
    assert {str(error_of(response)) for response in answers} == {
        str({"code": "shared_chat_not_found", "message": "Shared chat not found", "status": 404})}
    assert await db.fetchval("SELECT count(*) FROM chats WHERE share_id = ANY($1)", ids) == 0


@pytest.mark.parametrize("value", ["secret", "PUBLIC", " org", "", None, 1, True, ["org"], {"value": "org"}])
async def test_a_visibility_other_than_the_three_is_422_and_changes_nothing(
    client: httpx.AsyncClient, people: People, db: Pool, value: Any
) -> None:
    created = await client.post("/v1/chats", headers=people.owner, json={"title": "new", "visibility": value})
    assert created.status_code == 422
    assert [detail["loc"] for detail in created.json()["error"]["details"]] == [["visibility"]]
    chat = await chat_of(client, people, "org")
    before = await snapshot(db, chat.id)
    patched = await client.patch(f"/v1/chats/{chat.id}", headers=people.owner,
                                 json={"title": "renamed", "visibility": value})
    assert patched.status_code == 422 and patched.json()["error"]["code"] == "validation_error"
    assert await snapshot(db, chat.id) == before
    owner, _ = owner_claims(people.owner)
    assert await db.fetchval("SELECT count(*) FROM chats WHERE user_id = $1", owner) == 1


@pytest.mark.parametrize("query", ["scope=everyone", "scope=", "scope=org&deleted=true", "scope=ORG"])
async def test_a_bad_scope_is_422(client: httpx.AsyncClient, people: People, query: str) -> None:
    response = await client.get(f"/v1/chats?{query}", headers=people.member)
    assert response.status_code == 422 and response.json()["error"]["code"] == "validation_error"


async def test_visibility_is_set_on_create_and_by_patch(client: httpx.AsyncClient, people: People) -> None:
    default = (await client.post("/v1/chats", headers=people.owner, json={})).json()
    assert (default["visibility"], default["share_id"]) == ("private", None)
    for visibility in VISIBILITIES:
        created = await client.post("/v1/chats", headers=people.owner, json={"visibility": visibility})
        assert created.status_code == 201 and created.json()["visibility"] == visibility
        assert created.json()["share_id"] is None  # public is readable by the org; a link needs a share
    patched = await client.patch(f"/v1/chats/{default['id']}", headers=people.owner, json={"visibility": "org"})
    assert patched.json()["visibility"] == "org" and patched.json()["title"] is None
    read = await client.get(f"/v1/chats/{default['id']}", headers=people.member)
    assert read.status_code == 200 and "share_id" not in read.json()


async def test_sharing_makes_a_chat_public_and_keeps_its_link(
    client: httpx.AsyncClient, people: People, gateway: Gateway
) -> None:
    chat_id = await new_chat(client, people.owner, title="Plans")
    first = await client.post(f"/v1/chats/{chat_id}/share", headers=people.owner)
    assert first.status_code == 200
    share = first.json()
    assert SHARE_ID.fullmatch(share["share_id"]) and share["share_id"] not in chat_id
    assert share["url"] == f"{gateway.url}/v1/shared/{share['share_id']}"
    assert (await client.get(share["url"])).json() == {"title": "Plans", "messages": []}
    again = await client.post(f"/v1/chats/{chat_id}/share", headers=people.owner)
    assert again.json() == share
    chat = (await client.get(f"/v1/chats/{chat_id}", headers=people.owner)).json()
    assert (chat["visibility"], chat["share_id"]) == ("public", share["share_id"])
    listed = (await client.get("/v1/chats", headers=people.owner)).json()["items"]
    assert [(item["visibility"], item["share_id"]) for item in listed] == [("public", share["share_id"])]


async def test_a_dead_link_stays_dead(client: httpx.AsyncClient, people: People) -> None:
    """Revoked, made private or org, or deleted: the link dies, and neither a restore nor making the chat
    public again brings it back; a new share makes a new link."""
    chat = await chat_of(client, people, "public")
    owner = people.owner
    dead: list[str] = []

    async def share() -> str:
        share_id: str = (await client.post(f"/v1/chats/{chat.id}/share", headers=owner)).json()["share_id"]
        assert share_id not in dead and (await client.get(f"/v1/shared/{share_id}")).status_code == 200
        return share_id

    async def is_dead(share_id: str) -> None:
        dead.append(share_id)
        assert [(await client.get(f"/v1/shared/{old}")).status_code for old in dead] == [404] * len(dead)
        read = (await client.get(f"/v1/chats/{chat.id}", headers=owner)).json()
        assert read["share_id"] is None

    assert (await client.delete(f"/v1/chats/{chat.id}/share", headers=owner)).status_code == 204
    await is_dead(chat.share_id)
    assert (await client.get(f"/v1/chats/{chat.id}", headers=owner)).json()["visibility"] == "public"
    assert (await client.delete(f"/v1/chats/{chat.id}/share", headers=owner)).status_code == 204  # none: fine
    for visibility in ("org", "private"):
        share_id = await share()
        await client.patch(f"/v1/chats/{chat.id}", headers=owner, json={"visibility": visibility})
        await client.patch(f"/v1/chats/{chat.id}", headers=owner, json={"visibility": "public"})
        await is_dead(share_id)
    share_id = await share()
    await client.delete(f"/v1/chats/{chat.id}", headers=owner)
    assert (await client.post(f"/v1/chats/{chat.id}/share", headers=owner)).status_code == 404
    assert (await client.post(f"/v1/chats/{chat.id}/restore", headers=owner)).json()["visibility"] == "public"
    await is_dead(share_id)
    await share()


async def test_the_org_lists_the_chats_shared_with_it(client: httpx.AsyncClient, people: People) -> None:
    async def create(headers: dict[str, str], title: str, visibility: str) -> str:
        return await new_chat(client, headers, title=title, visibility=visibility)

    await create(people.owner, "owner private", "private")
    owner_org = await create(people.owner, "owner org notes", "org")
    owner_public = await create(people.owner, "owner public notes", "public")
    member_org = await create(people.member, "member org", "org")
    member_gone = await create(people.member, "member deleted", "org")
    await client.delete(f"/v1/chats/{member_gone}", headers=people.member)
    await create(people.outsider, "outsider org", "org")
    await client.post(f"/v1/chats/{owner_public}/share", headers=people.owner)

    page = (await client.get("/v1/chats?scope=org", headers=people.member)).json()
    assert [item["id"] for item in page["items"]] == [member_org, owner_public, owner_org] and page["total"] == 3
    assert ["share_id" in item for item in page["items"]] == [True, False, False]  # only in the owner's view
    found = (await client.get("/v1/chats?scope=org&q=notes&limit=1&offset=1", headers=people.member)).json()
    assert [item["id"] for item in found["items"]] == [owner_org] and found["total"] == 2
    past = (await client.get("/v1/chats?scope=org&offset=10", headers=people.member)).json()
    assert past["items"] == [] and past["total"] == 3
    assert (await client.get("/v1/chats?scope=org", headers=people.outsider)).json()["total"] == 1
    own = (await client.get("/v1/chats", headers=people.member)).json()
    assert [item["id"] for item in own["items"]] == [member_org]


async def test_a_link_works_from_every_instance(
    client: httpx.AsyncClient, people: People, start_gateway: Any
) -> None:
    chat = await chat_of(client, people, "public")
    async with start_gateway() as other, httpx.AsyncClient(base_url=other.url) as elsewhere:
        assert (await elsewhere.get(f"/v1/shared/{chat.share_id}")).json()["title"] == "Plans"
        assert (await elsewhere.delete(f"/v1/chats/{chat.id}/share", headers=people.owner)).status_code == 204
    assert (await client.get(f"/v1/shared/{chat.share_id}")).status_code == 404


@pytest.mark.parametrize("change", ["visibility = 'org'", "visibility = 'private'", "deleted_at = now()"])
async def test_only_a_live_public_chat_holds_a_link(
    client: httpx.AsyncClient, people: People, db: Pool, change: str
) -> None:
    """The link's read asks for nothing but its id: the database refuses a link on any other chat."""
    chat = await chat_of(client, people, "public")
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(f"UPDATE chats SET {change} WHERE id = $1", uuid.UUID(chat.id))
    assert (await client.get(f"/v1/shared/{chat.share_id}")).status_code == 200


async def test_answers_match_the_description(client: httpx.AsyncClient, people: People) -> None:
    chat = await chat_of(client, people, "public")
    held(openapi.Share, await client.post(f"/v1/chats/{chat.id}/share", headers=people.owner))
    held(openapi.SharedChat, await client.get(f"/v1/shared/{chat.share_id}"))
    held(openapi.Error, await client.get(f"/v1/shared/{secrets.token_urlsafe(16)}"), 404)
    owners = held(openapi.ChatWithMessages, await client.get(f"/v1/chats/{chat.id}", headers=people.owner))
    members = held(openapi.ChatWithMessages, await client.get(f"/v1/chats/{chat.id}", headers=people.member))
    assert owners.share_id == chat.share_id and "share_id" not in members.model_fields_set
    held(openapi.ChatPage, await client.get("/v1/chats?scope=org", headers=people.member))
    held(openapi.MessageList, await client.get(f"/v1/chats/{chat.id}/messages", headers=people.member))


async def test_the_page_shares_a_chat_and_shows_it_read_only(start_gateway: Callable[..., Any]) -> None:
    async with start_gateway(dev_mode=True) as gateway, async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = await browser.new_page()
        await page.goto(gateway.url)
        await page.get_by_role("button", name="Get a dev token").click()
        await page.get_by_label("Message").fill("a question worth sharing")
        await page.get_by_role("button", name="Send").click()
        await expect(page.locator("#messages li.assistant")).to_have_attribute("data-finish-reason", "stop")
        await page.get_by_role("button", name="Share", exact=True).click()
        link = page.get_by_label("Share link")
        await expect(link).to_have_value(re.compile(r"/\?shared=[A-Za-z0-9_-]{22}$"))
        url = await link.input_value()
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "share-button.png"))

        reader = await (await browser.new_context()).new_page()  # no token anywhere
        await reader.goto(url)
        await expect(reader.locator("#chat-title")).to_have_text("a question worth sharing")
        await expect(reader.locator("#messages li .text")).to_have_text(["a question worth sharing"] * 2)
        for hidden in ("#composer", "#token-form", "#chat-list", "#share", "#delete"):
            await expect(reader.locator(hidden)).to_be_hidden()
        await reader.screenshot(path=str(ARTIFACTS / "shared-view.png"))

        await page.get_by_role("button", name="Stop sharing").click()
        await expect(link).to_be_hidden()
        await reader.reload()
        await expect(reader.locator("#status")).to_have_text("This link is unknown or no longer shared.")
        await expect(reader.locator("#messages li")).to_have_count(0)
        await browser.close()
