"""A chat's title written by a model (GATEWAY_TITLE_MODEL) beside its first turn, over real HTTP, PostgreSQL
and Redis: through each vendor's fake server, and through the fake provider, whose echo makes the title the
first message's words, folded and cut."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import httpx_sse
import orjson
import pytest

from gateway.app import create_app
from gateway.settings import Settings
from gateway.streaming.titles import TITLE_PROMPT, TitleWriter, clean_title
from providers.fake import FakeProvider
from providers.registry import ProviderRegistry
from storage.chats import Owner, set_model_title
from storage.db import Pool
from tests.api.test_send import new_chat, next_delta, read_events
from tests.conftest import Gateway, auth_headers
from tests.streaming.test_dispatch import vendor_gateway
from tests.vendors import PROMPT_TOKENS, TEXT, TOKENS, VENDORS, VendorServer

# A first message, and the two titles it makes: cut by the gateway (80 characters), and by the fake's echo
# through the title model (folded, quotes and the final period stripped, 60 characters).
MESSAGE = '  "Plan a   weekend trip to the mountains with friends and family this autumn, please."  '
CUT_TITLE = '"Plan a weekend trip to the mountains with friends and family this autumn,'
MODEL_TITLE = "Plan a weekend trip to the mountains with friends and family"


@contextlib.asynccontextmanager
async def titled_gateway(start_gateway: Any, title_model: str = "fake/echo", **overrides: Any
                         ) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
    async with start_gateway(title_model=title_model, **overrides) as gateway, \
            httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        yield gateway, client


def titles_of(gateway: Gateway) -> TitleWriter:
    titles = gateway.services.titles
    assert titles is not None
    return titles


def someone() -> dict[str, str]:
    return auth_headers(f"u-{uuid.uuid4().hex[:8]}", f"org-{uuid.uuid4().hex[:8]}")


async def send(client: httpx.AsyncClient, headers: dict[str, str], chat_id: str, content: str
               ) -> list[httpx_sse.ServerSentEvent]:
    async with client.stream("POST", f"/v1/chats/{chat_id}/messages", headers=headers,
                             json={"content": content}) as response:
        assert response.status_code == 200, await response.aread()
        return [event async for event in read_events(response)]


async def chat_title(client: httpx.AsyncClient, headers: dict[str, str], chat_id: str) -> str | None:
    title: str | None = (await client.get(f"/v1/chats/{chat_id}", headers=headers)).json()["title"]
    return title


async def ledger(db: Pool, chat_id: str) -> list[tuple[str, str, int, int, int]]:
    rows = await db.fetch("SELECT kind, model, input_tokens, output_tokens, charged_tokens FROM usage_ledger "
                          "WHERE chat_id = $1 ORDER BY id", uuid.UUID(chat_id))
    return [tuple(row) for row in rows]


def title_usage(message: str) -> tuple[int, int]:
    """The fake's usage for the title call: its prompt by the characters, its output a token a word."""
    return (len(TITLE_PROMPT) + len(message)) // 4, len(message.split())


@pytest.mark.parametrize("vendor", VENDORS)
async def test_a_vendor_model_writes_the_title_sent_before_done(
    start_gateway: Any, vendors: dict[str, Any], vendor: str, db: Pool
) -> None:
    server: VendorServer = vendors[vendor][0]
    headers, marker = someone(), uuid.uuid4().hex
    async with vendor_gateway(start_gateway, vendors, title_model=f"{vendor}/normal") as gateway, \
            httpx.AsyncClient(base_url=gateway.url) as client:
        chat_id = await new_chat(client, headers)
        events = await send(client, headers, chat_id, f"What is {marker}?")
        assert await chat_title(client, headers, chat_id) == TEXT
    assert [e.event for e in events][-3:] == ["usage", "title", "done"]
    assert [e.id for e in events] == [str(n) for n in range(1, len(events) + 1)]
    assert events[-2].json() == {"title": TEXT}
    assert "".join(e.json()["text"] for e in events if e.event == "delta") == f"What is {marker}?"
    asked = [r["body"] for r in server.requests if marker.encode() in orjson.dumps(r["body"])]
    assert len(asked) == 1 and TITLE_PROMPT.encode() in orjson.dumps(asked[0])
    assert ("title", f"{vendor}/normal", PROMPT_TOKENS, len(TOKENS), PROMPT_TOKENS + len(TOKENS)) \
        in await ledger(db, chat_id)


async def test_the_fake_titles_a_chat_with_its_first_message_folded_and_cut(
    start_gateway: Any, db: Pool
) -> None:
    headers = someone()
    async with titled_gateway(start_gateway) as (gateway, client):
        chat_id = await new_chat(client, headers)
        events = await send(client, headers, chat_id, MESSAGE)
        assert await chat_title(client, headers, chat_id) == MODEL_TITLE
        # A JSON answer's chat (made by /v1/chat) is titled the same way, beside it.
        answer = await client.post("/v1/chat", headers={**headers, "Accept": "application/json"},
                                   json={"message": MESSAGE})
        await titles_of(gateway).settled()
        assert await chat_title(client, headers, answer.json()["chat_id"]) == MODEL_TITLE
    names = [e.event for e in events]
    assert names[0] == "start" and names[-3:] == ["usage", "title", "done"]
    assert events[-2].json() == {"title": MODEL_TITLE}
    assert "".join(e.json()["text"] for e in events if e.event == "delta") == MESSAGE.lstrip()  # the echo drops leading space


async def test_the_ui_stream_carries_the_title_as_a_data_part(start_gateway: Any) -> None:
    async with titled_gateway(start_gateway) as (_, client):
        response = await client.post("/v1/ui/chat", headers=someone(), json={
            "id": "titled", "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": MESSAGE}]}]})
    chunks = [orjson.loads(line[6:]) for line in response.text.split("\n\n") if line.startswith("data: {")]
    assert [c["type"] for c in chunks][-3:] == ["text-end", "data-title", "finish"]
    assert chunks[-2]["data"] == {"title": MODEL_TITLE}


@pytest.mark.parametrize("how", ["at creation", "by PATCH"])
async def test_a_chat_the_user_named_keeps_its_name(start_gateway: Any, db: Pool, how: str) -> None:
    headers = someone()
    async with titled_gateway(start_gateway) as (_, client):
        if how == "at creation":
            chat_id = await new_chat(client, headers, title="Trip plans")
        else:
            chat_id = await new_chat(client, headers)
            await client.patch(f"/v1/chats/{chat_id}", headers=headers, json={"title": "Trip plans"})
        events = await send(client, headers, chat_id, MESSAGE)
        assert await chat_title(client, headers, chat_id) == "Trip plans"
    assert "title" not in [e.event for e in events]
    assert [row[0] for row in await ledger(db, chat_id)] == ["chat"]


async def test_a_model_title_never_replaces_a_name_given_while_it_was_written(
    start_gateway: Any, db: Pool
) -> None:
    """The write of a model's title holds only over the cut title it replaces: a PATCH in between wins."""
    user, org = f"u-{uuid.uuid4().hex[:8]}", f"org-{uuid.uuid4().hex[:8]}"
    headers = auth_headers(user, org)
    async with titled_gateway(start_gateway, title_model="fake/echo?fail_after=0") as (_, client):
        chat_id = await new_chat(client, headers)
        await send(client, headers, chat_id, MESSAGE)
        assert await chat_title(client, headers, chat_id) == CUT_TITLE
        await client.patch(f"/v1/chats/{chat_id}", headers=headers, json={"title": "Mine"})
    assert not await set_model_title(db, Owner(org, user), uuid.UUID(chat_id), CUT_TITLE, MODEL_TITLE)
    assert await db.fetchval("SELECT title FROM chats WHERE id = $1", uuid.UUID(chat_id)) == "Mine"


async def test_a_second_turn_never_retitles(start_gateway: Any, db: Pool) -> None:
    headers = someone()
    async with titled_gateway(start_gateway) as (_, client):
        chat_id = await new_chat(client, headers)
        await send(client, headers, chat_id, MESSAGE)
        second = await send(client, headers, chat_id, "And what should we pack for the cold nights there?")
        assert await chat_title(client, headers, chat_id) == MODEL_TITLE
    assert "title" not in [e.event for e in second]
    assert sorted(row[0] for row in await ledger(db, chat_id)) == ["chat", "chat", "title"]


@pytest.mark.parametrize("cause", ["vendor error", "quota refused"])
async def test_a_failed_title_call_keeps_the_cut_title_and_the_answer(
    start_gateway: Any, db: Pool, caplog: pytest.LogCaptureFixture, cause: str
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.streaming.titles")
    # The quota: room for the answer (a few tokens of prompt, 100 of output), none for the title call.
    settings = ({"title_model": "fake/echo?fail_after=0&fail=500"} if cause == "vendor error"
                else {"quota_user_tokens": 150})
    headers = someone()
    async with titled_gateway(start_gateway, **settings) as (gateway, client):
        chat_id = await new_chat(client, headers)
        async with client.stream("POST", f"/v1/chats/{chat_id}/messages", headers=headers,
                                 json={"content": MESSAGE, "max_tokens": 100}) as response:
            events = [event async for event in read_events(response)]
        await titles_of(gateway).settled()
        assert await chat_title(client, headers, chat_id) == CUT_TITLE
    assert [e.event for e in events][-2:] == ["usage", "done"]
    assert events[-1].json()["finish_reason"] == "stop"
    assert "".join(e.json()["text"] for e in events if e.event == "delta") == MESSAGE.lstrip()  # the echo drops leading space
    assert [row[0] for row in await ledger(db, chat_id)] == ["chat"]
    code = "upstream_error" if cause == "vendor error" else "quota_exceeded"
    assert [vars(r).get("code") for r in caplog.records if r.name == "gateway.streaming.titles"] == [code]


async def test_the_title_call_is_charged_to_the_user(start_gateway: Any, db: Pool) -> None:
    headers = someone()
    async with titled_gateway(start_gateway) as (_, client):
        chat_id = await new_chat(client, headers)
        events = await send(client, headers, chat_id, MESSAGE)
        assert events[-2].event == "title"  # the call is settled and in the ledger before its title is sent
        used = (await client.get("/v1/usage", headers=headers)).json()["user_tokens"]["used"]
    rows = await ledger(db, chat_id)  # in either order: the title's call may end before the answer
    by_kind = {row[0]: row for row in rows}
    assert len(rows) == 2 and sorted(by_kind) == ["chat", "title"]
    input_tokens, output_tokens = title_usage(MESSAGE)
    assert by_kind["title"] == ("title", "fake/echo", input_tokens, output_tokens, input_tokens + output_tokens)
    assert used == by_kind["chat"][4] + by_kind["title"][4] > by_kind["chat"][4]


async def test_a_user_at_the_stream_limit_gets_the_title_once_the_answer_frees_its_slot(
    start_gateway: Any, db: Pool
) -> None:
    headers = someone()
    async with titled_gateway(start_gateway, quota_max_concurrent_streams=1) as (_, client):
        chat_id = await new_chat(client, headers, model="fake/echo?tokens=20&gap_ms=5")
        events = await send(client, headers, chat_id, MESSAGE)
    assert events[-2].json() == {"title": MODEL_TITLE}
    assert sorted(row[0] for row in await ledger(db, chat_id)) == ["chat", "title"]


async def test_a_slow_title_reaches_the_chat_after_the_stream(start_gateway: Any, db: Pool) -> None:
    """The answer streams without waiting for the title; the stream waits for it at most 2 s after the
    answer, then ends without it, and the chat gets it when it is written."""
    headers = someone()
    async with titled_gateway(start_gateway, title_model="fake/echo?ttft_ms=3000") as (gateway, client):
        titles = titles_of(gateway)
        chat_id = await new_chat(client, headers)
        async with client.stream("POST", f"/v1/chats/{chat_id}/messages", headers=headers,
                                 json={"content": MESSAGE}) as response:
            stream = read_events(response)
            await next_delta(stream)
            assert titles.pending  # the title is still being written: the first token did not wait for it
            rest = [event async for event in stream]
        assert [e.event for e in rest][-2:] == ["usage", "done"]
        assert await chat_title(client, headers, chat_id) == CUT_TITLE
        await titles.settled()
        assert await chat_title(client, headers, chat_id) == MODEL_TITLE
    assert sorted(row[0] for row in await ledger(db, chat_id)) == ["chat", "title"]


@pytest.mark.parametrize(("answer", "title"), [
    ('  "Weekend   trip\nto the mountains."  ', "Weekend trip to the mountains"),
    ("\u201cQuarterly report\u201d.", "Quarterly report"),
    ("'Tips...'", "Tips"),
    ("Why is the sky blue?", "Why is the sky blue?"),
    ("word " * 20, "word word word word word word word word word word word word"),
    ("x" * 70, "x" * 60),
    (' "" . ', ""),
])
def test_a_model_answer_is_cleaned_into_a_title(answer: str, title: str) -> None:
    assert clean_title(answer) == title


@pytest.mark.parametrize("model", ["nowhere/model", "fake/echo?tokens=-1"])
def test_a_title_model_no_provider_serves_stops_the_gateway_before_it_serves(
    settings: Settings, model: str
) -> None:
    with pytest.raises(RuntimeError, match="GATEWAY_TITLE_MODEL"):
        create_app(settings.model_copy(update={"title_model": model}), ProviderRegistry([FakeProvider()]))
