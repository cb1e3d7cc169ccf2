"""Text PostgreSQL cannot store (NUL, lone surrogates) and numbers past what it holds: a 422 naming the
field, never a 5xx, and nothing stored."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest

from providers.base import Finish, ProviderRequest, ProviderStream, Pump, StreamBatch
from providers.fake import FakeProvider
from providers.registry import ProviderRegistry
from storage.db import Pool
from tests.api.test_send import new_chat, read_events, reply_row
from tests.vendors import ScriptedProvider

NUL = "a\u0000b"


async def owner_rows(db: Pool, headers: dict[str, str]) -> list[int]:
    """How many chats and messages the caller's org holds."""
    token = headers["Authorization"].removeprefix("Bearer ")
    org = jwt.decode(token, options={"verify_signature": False})["org"]
    return [await db.fetchval(f"SELECT count(*) FROM {table} WHERE org_id = $1", org)
            for table in ("chats", "messages")]


@pytest.mark.parametrize(("path", "body", "loc"), [
    ("/v1/chats", {"title": NUL}, ["title"]),
    ("/v1/chats", {"system_prompt": NUL}, ["system_prompt"]),
    ("/v1/chats", {"metadata": {"k": {"deep": [1, NUL]}}}, ["metadata", "k", "deep", 1]),
    ("/v1/chats", {"metadata": {NUL: 1}}, ["metadata", NUL]),
    ("/v1/chat", {"message": NUL}, ["message"]),
    ("/v1/chat", {"message": "hi", "client_message_id": NUL}, ["client_message_id"]),
    ("/v1/chat/completions", {"model": "fake/echo", "messages": [{"role": "user", "content": NUL}]},
     ["messages", 0, "content"]),
    ("/v1/chat/completions", {"model": "fake/echo", "messages": [
        {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": NUL}}]},
        {"role": "user", "content": "hi"}]}, ["messages", 0, "tool_calls", 0, "function", "arguments"]),
], ids=["title", "system-prompt", "metadata-value", "metadata-key", "message", "client-id", "completion",
        "tool-input"])
async def test_a_nul_anywhere_is_a_422_naming_the_field_and_stores_nothing(
    client: httpx.AsyncClient, alice: dict[str, str], db: Pool, path: str, body: dict[str, Any], loc: list[Any]
) -> None:
    before = await owner_rows(db, alice)
    response = await client.post(path, headers=alice, json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "validation_error" or error.get("param") is not None
    details = error.get("details") or [{"loc": error["param"].split(".")}]
    assert [str(part) for part in details[0]["loc"]] == [str(part) for part in loc]
    assert await owner_rows(db, alice) == before


async def test_a_lone_surrogate_is_a_422_naming_the_field(
    client: httpx.AsyncClient, alice: dict[str, str], db: Pool
) -> None:
    chat_id = await new_chat(client, alice)
    before = await owner_rows(db, alice)
    raw = b'{"content": "half \\ud83d of a pair"}'
    response = await client.post(f"/v1/chats/{chat_id}/messages", headers={**alice, "Content-Type": "application/json"},
                                 content=raw)
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["loc"] == ["content"]
    assert await owner_rows(db, alice) == before


async def test_a_whole_surrogate_pair_is_text_like_any_other(client: httpx.AsyncClient, alice: dict[str, str]) -> None:
    raw = b'{"message": "a smile \\ud83d\\ude00"}'
    response = await client.post("/v1/chat", headers={**alice, "Content-Type": "application/json",
                                                      "Accept": "application/json"}, content=raw)
    assert response.status_code == 200
    assert response.json()["assistant_message"]["content"] == "a smile \U0001f600"


@pytest.mark.parametrize("query", ["q=a%00b", "offset=99999999999999999999", "limit=99999999999999999999"])
async def test_a_query_the_database_cannot_take_is_a_422(
    client: httpx.AsyncClient, alice: dict[str, str], query: str
) -> None:
    response = await client.get(f"/v1/chats?{query}", headers=alice)
    assert response.status_code == 422, response.text


@pytest.mark.parametrize("query", ["message_offset=99999999999999999999", "message_limit=-1"])
async def test_a_chat_read_with_numbers_past_the_database_is_a_422(
    client: httpx.AsyncClient, alice: dict[str, str], query: str
) -> None:
    chat_id = await new_chat(client, alice)
    response = await client.get(f"/v1/chats/{chat_id}?{query}", headers=alice)
    assert response.status_code == 422
    messages = await client.get(f"/v1/chats/{chat_id}/messages?offset=99999999999999999999", headers=alice)
    assert messages.status_code == 422


@pytest.mark.parametrize("depth", [300, 5000])
async def test_deeply_nested_metadata_is_refused_without_a_5xx(
    client: httpx.AsyncClient, alice: dict[str, str], depth: int
) -> None:
    deep = "[" * depth + "]" * depth
    response = await client.post("/v1/chats", headers={**alice, "Content-Type": "application/json"},
                                 content=b'{"metadata": {"x": ' + deep.encode() + b"}}")
    assert response.status_code == 422


class NulProvider(ScriptedProvider):
    """A vendor whose answer holds NULs: ``nul/model`` streams "he\\0llo", "\\0", " world"."""

    name = "nul"
    models: tuple[str, ...] = ("model",)

    def stream(self, request: ProviderRequest) -> ProviderStream:
        return Pump(self._batches())

    async def _batches(self) -> AsyncIterator[StreamBatch]:
        yield ["he\x00llo"]
        yield ["\x00"]
        yield [" world", Finish("stop")]


async def test_a_nul_in_a_models_answer_is_dropped_from_the_stream_and_the_stored_reply(
    start_gateway: Any, db: Pool, alice: dict[str, str]
) -> None:
    async with start_gateway(ProviderRegistry([FakeProvider(), NulProvider()])) as gateway, \
            httpx.AsyncClient(base_url=gateway.url) as http:
        async with http.stream("POST", "/v1/chat", headers=alice, json={"message": "hi", "model": "nul/model"}) as r:
            events = [event async for event in read_events(r)]
        collected = await http.post("/v1/chat", headers={**alice, "Accept": "application/json"},
                                    json={"message": "hi", "model": "nul/model"})
    deltas = [event.json()["text"] for event in events if event.event == "delta"]
    assert deltas == ["hello", " world"]
    row = await reply_row(db, events[0].json()["assistant_message_id"])
    assert row["content"] == "hello world" and row["status"] == "complete"
    assert collected.json()["assistant_message"]["content"] == "hello world"
