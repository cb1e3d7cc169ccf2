"""Resumable streams between two in-process instances on one PostgreSQL and Redis: a turn's events replayed
and followed from any instance, its sender's hang-up cancelling it or not, several readers at once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import httpx_sse
import orjson
import pytest
from redis.asyncio import Redis

from gateway.embedded import embedded_redis
from gateway.streaming.replay import kept_reply
from storage.db import Pool
from storage.tapes import Entry, Tapes
from tests.api.test_send import eventually, new_chat, read_events, reply_row
from tests.conftest import Gateway, auth_headers

PACED = "fake/echo?tokens=60&gap_ms=20"


@pytest.fixture
def user() -> dict[str, str]:
    return auth_headers(f"u-{uuid.uuid4().hex[:8]}", f"org-{uuid.uuid4().hex[:8]}")


@pytest.fixture
async def pair(start_gateway: Callable[..., Any]) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    async with start_gateway() as a, start_gateway() as b:
        async with httpx.AsyncClient(base_url=a.url, timeout=30) as ca, httpx.AsyncClient(base_url=b.url, timeout=30) as cb:
            yield ca, cb


def ids_of(events: list[httpx_sse.ServerSentEvent]) -> list[int]:
    return [int(event.id) for event in events]


def text_of(events: list[httpx_sse.ServerSentEvent]) -> str:
    return "".join(event.json()["text"] for event in events if event.event == "delta")


async def read_first(client: httpx.AsyncClient, path: str, headers: dict[str, str], body: dict[str, Any],
                     deltas: int) -> list[httpx_sse.ServerSentEvent]:
    """Send, read up to the ``deltas``-th delta, and hang up."""
    seen = []
    async with client.stream("POST", path, headers=headers, json=body) as response:
        assert response.status_code == 200
        async for event in read_events(response):
            seen.append(event)
            if sum(e.event == "delta" for e in seen) == deltas:
                break
    return seen


async def resume(client: httpx.AsyncClient, chat_id: str, headers: dict[str, str], after: int | None = None,
                 **params: str) -> tuple[int, list[httpx_sse.ServerSentEvent]]:
    extra = {} if after is None else {"Last-Event-ID": str(after)}
    async with client.stream("GET", f"/v1/chats/{chat_id}/stream", headers={**headers, **extra},
                             params=params) as response:
        if response.status_code != 200:
            await response.aread()
            return response.status_code, []
        return 200, [event async for event in read_events(response)]


async def test_a_continue_turn_whose_sender_left_is_resumed_on_the_other_instance(
    pair: tuple[httpx.AsyncClient, httpx.AsyncClient], user: dict[str, str], db: Pool
) -> None:
    a, b = pair
    chat_id = await new_chat(a, user, model=PACED)
    first = await read_first(a, f"/v1/chats/{chat_id}/messages", user,
                             {"content": "keep going without me", "on_disconnect": "continue"}, 5)
    status, rest = await resume(b, chat_id, user, after=int(first[-1].id))
    assert status == 200
    events = first + rest
    assert ids_of(events) == list(range(1, len(events) + 1))
    assert events[-1].event == "done" and events[-1].json()["finish_reason"] == "stop"
    message_id = first[0].json()["assistant_message_id"]
    row = await reply_row(db, message_id)
    assert row["status"] == "complete" and row["content"] == text_of(events)
    assert text_of(events).split() == ["keep", "going", "without", "me"] * 15

    # Within retention the whole turn replays, byte for byte the same events, from the start or any id.
    status, again = await resume(a, chat_id, user)
    assert status == 200 and [(e.id, e.event, e.data) for e in again] == [(e.id, e.event, e.data) for e in events]
    status, tail = await resume(b, chat_id, user, message_id=message_id, after="3")
    assert (status == 200 and tail == []) or ids_of(tail)[0] == 4
    status, tail = await resume(b, chat_id, user, after=3)
    assert ids_of(tail) == list(range(4, len(events) + 1))
    # After the last event there is nothing more to send.
    assert (await resume(b, chat_id, user, after=len(events)))[0] == 204


async def test_resume_without_a_kept_turn_or_of_another_tenant(
    pair: tuple[httpx.AsyncClient, httpx.AsyncClient], user: dict[str, str]
) -> None:
    a, b = pair
    chat_id = await new_chat(a, user, model=PACED)
    assert (await resume(b, chat_id, user))[0] == 204
    other = auth_headers("someone-else", "org-else")
    assert (await resume(b, chat_id, other))[0] == 404
    assert (await resume(b, str(uuid.uuid4()), user))[0] == 404
    body = {"content": "hi", "model": "fake/echo"}
    response = await a.post(f"/v1/chats/{chat_id}/messages", headers=user, json=body)
    assert response.status_code == 200
    # Kept a flush after its client had it all: until then, no turn to resume.
    await eventually(lambda: _resumes(b, chat_id, user))
    assert (await resume(b, chat_id, other))[0] == 404  # a kept turn, but not theirs
    for bad in ("x", "-1", "1.5", "99999999999999999999"):
        response = await b.get(f"/v1/chats/{chat_id}/stream", headers={**user, "Last-Event-ID": bad})
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_event_id"
    response = await b.get(f"/v1/chats/{chat_id}/stream", headers=user, params={"after": "500"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_event_id"
    response = await b.post(f"/v1/chats/{chat_id}/messages", headers=user,
                            json={"content": "hi", "on_disconnect": "later"})
    assert response.status_code == 422


async def _resumes(client: httpx.AsyncClient, chat_id: str, headers: dict[str, str]) -> bool:
    return (await resume(client, chat_id, headers))[0] == 200


async def test_a_cancel_turn_ends_with_its_sender_and_its_resumer_hears_how(
    pair: tuple[httpx.AsyncClient, httpx.AsyncClient], user: dict[str, str], db: Pool
) -> None:
    a, b = pair
    chat_id = await new_chat(a, user, model="fake/echo?tokens=2000&gap_ms=10")
    async with a.stream("POST", f"/v1/chats/{chat_id}/messages", headers=user, json={"content": "go"}) as response:
        events = read_events(response)
        start = await anext(events)
        async with b.stream("GET", f"/v1/chats/{chat_id}/stream", headers=user) as resumed:
            following = read_events(resumed)
            assert (await anext(following)).event == "start"
            await anext(following)
            await response.aclose()  # the sender hangs up: its turn ends
            rest = [event async for event in following]
    assert rest[-1].event == "done" and rest[-1].json()["finish_reason"] == "client_disconnected"
    message_id = start.json()["assistant_message_id"]
    await eventually(lambda: _status_is(db, message_id, "cancelled"))


async def _status_is(db: Pool, message_id: str, status: str) -> bool:
    return bool((await reply_row(db, message_id))["status"] == status)


async def test_a_frozen_reader_slows_no_other(
    start_gateway: Callable[..., Any], user: dict[str, str], db: Pool
) -> None:
    async with start_gateway(send_timeout_s=1.0) as a, start_gateway() as b:
        async with httpx.AsyncClient(base_url=a.url, timeout=30) as ca, httpx.AsyncClient(base_url=b.url, timeout=30) as cb:
            chat_id = await new_chat(ca, user, model="fake/echo?tokens=20000&gap_ms=0")
            host, port = a.url.removeprefix("http://").split(":")
            async with ca.stream("POST", f"/v1/chats/{chat_id}/messages", headers=user,
                                 json={"content": "a long answer", "on_disconnect": "continue"}) as response:
                start = await anext(read_events(response))
                # A reader that asks and then never reads: its socket fills, its sends stall.
                _reader, writer = await asyncio.open_connection(host, int(port))
                writer.transport.get_extra_info("socket").setsockopt(__import__("socket").SOL_SOCKET,
                                                                   __import__("socket").SO_RCVBUF, 4096)
                request = (f"GET /v1/chats/{chat_id}/stream HTTP/1.1\r\nHost: x\r\n"
                           f"Authorization: {user['Authorization']}\r\n\r\n")
                writer.write(request.encode())
                await writer.drain()
                status, events = await resume(cb, chat_id, user)
                assert status == 200 and events[-1].event == "done"
                assert ids_of(events) == list(range(1, len(events) + 1))
                writer.close()
    row = await reply_row(db, start.json()["assistant_message_id"])
    assert row["status"] == "complete" and row["content"] == text_of(events)


async def test_a_turn_has_at_most_its_readers(
    start_gateway: Callable[..., Any], user: dict[str, str], redis: Redis
) -> None:
    async with start_gateway(max_readers_per_turn=1) as a, httpx.AsyncClient(base_url=a.url, timeout=30) as client:
        chat_id = await new_chat(client, user, model="fake/echo?tokens=200&gap_ms=10")
        async with client.stream("POST", f"/v1/chats/{chat_id}/messages", headers=user, json={"content": "x"}) as sent:
            events = read_events(sent)
            await anext(events)
            async with client.stream("GET", f"/v1/chats/{chat_id}/stream", headers=user) as first:
                assert first.status_code == 200
                reading = read_events(first)  # kept referenced: a dropped iterator closes its connection
                await anext(reading)
                refused = await client.get(f"/v1/chats/{chat_id}/stream", headers=user)
                assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_readers"
            # The reader that left frees its place once its instance sees it gone (not by lapsing).
            async def freed() -> bool:
                places = [await redis.zcard(key) async for key in redis.scan_iter(match=f"*{{{chat_id}}}*:readers")]
                return not any(places)  # its set empty, or gone
            await eventually(freed, timeout=5)
            async with client.stream("GET", f"/v1/chats/{chat_id}/stream", headers=user) as second:
                assert second.status_code == 200
                rest = [event async for event in read_events(second)]
            assert rest[-1].event == "done"
            assert [event async for event in events][-1].event == "done"  # the sender read on throughout


async def test_the_deployment_default_lets_a_turn_continue_and_bounds_it(
    start_gateway: Callable[..., Any], user: dict[str, str], db: Pool
) -> None:
    async with start_gateway(on_disconnect="continue", detached_max_s=2) as a, \
            httpx.AsyncClient(base_url=a.url, timeout=30) as client:
        chat_id = await new_chat(client, user, model="fake/echo?tokens=10&gap_ms=5")
        first = await read_first(client, f"/v1/chats/{chat_id}/messages", user, {"content": "short one"}, 2)
        status, rest = await resume(client, chat_id, user, after=int(first[-1].id))
        assert status == 200 and rest[-1].event == "done" and rest[-1].json()["finish_reason"] == "stop"
        row = await reply_row(db, first[0].json()["assistant_message_id"])
        assert row["status"] == "complete" and row["content"] == text_of(first + rest)
        # Past GATEWAY_DETACHED_MAX_S unread, a turn ends there, what it streamed kept; ``cancel`` still cancels.
        slow = await new_chat(client, user, model="fake/echo?tokens=2000&gap_ms=20")
        first = await read_first(client, f"/v1/chats/{slow}/messages", user, {"content": "long one"}, 2)
        _, rest = await resume(client, slow, user, after=int(first[-1].id))
        assert rest[-1].event == "done" and rest[-1].json()["finish_reason"] == "client_disconnected"
        row = await reply_row(db, first[0].json()["assistant_message_id"])
        assert row["status"] == "cancelled" and row["content"] == text_of(first + rest)
        assert 2 < len(row["content"].split()) < 2000
        cancelled = await new_chat(client, user, model="fake/echo?tokens=2000&gap_ms=20")
        first = await read_first(client, f"/v1/chats/{cancelled}/messages", user,
                                 {"content": "stop when I go", "on_disconnect": "cancel"}, 2)
        _status, rest = await resume(client, cancelled, user, after=int(first[-1].id))
        assert rest[-1].json()["finish_reason"] == "client_disconnected"
        assert len(text_of(first + rest).split()) < 2000


async def test_the_kept_frames_rebuild_the_stored_reply(
    client: httpx.AsyncClient, gateway: Gateway, user: dict[str, str], db: Pool
) -> None:
    """What a dead turn's reply is rebuilt from: its kept frames hold the stored text and parts, reasoning
    and tool calls in stream order, in either protocol's frames."""
    tapes = gateway.services.streams.tapes
    assert tapes is not None
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    chat_id = await new_chat(client, user, model="fake/think")
    body = {"content": "weather in Paris", "tools": [weather], "tool_choice": "required"}
    async with client.stream("POST", f"/v1/chats/{chat_id}/messages", headers=user, json=body) as response:
        events = [event async for event in read_events(response)]
    message_id = events[0].json()["assistant_message_id"]
    row = await reply_row(db, message_id)
    assert row["finish_reason"] == "tool_calls"
    kept = await kept_end(tapes, uuid.UUID(chat_id), uuid.UUID(message_id))
    # Signatures are not in the events: a rebuilt reply's reasoning has none.
    assert kept_reply(kept) == (row["content"], [{k: v for k, v in part.items() if k != "signature"}
                                                 for part in row["parts"]])

    ui_id = f"ui-{uuid.uuid4().hex[:8]}"
    body = {"id": ui_id, "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": "hello there"}]}],
            "model": "fake/think"}
    async with client.stream("POST", "/v1/ui/chat", headers=user, json=body) as response:
        chunks = [event async for event in read_events(response)]
    start = orjson.loads(chunks[0].data)
    ui_chat = uuid.UUID(start["messageMetadata"]["chatId"])
    row = await reply_row(db, start["messageId"])
    kept = await kept_end(tapes, ui_chat, uuid.UUID(start["messageId"]))
    assert kept_reply(kept) == (row["content"], [{k: v for k, v in part.items() if k != "signature"}
                                                 for part in row["parts"]])
    assert row["content"] == "hello there"


async def kept_end(tapes: Tapes, chat_id: uuid.UUID, message_id: uuid.UUID) -> list[Entry]:
    """A turn's kept entries once its end is kept (a flush after its client had it)."""
    key = tapes.turn_key(chat_id, message_id)
    found: list[Entry] = []

    async def ended() -> bool:
        nonlocal found
        found = (await tapes.everything([key]))[0]
        return bool(found) and b"e" in found[-1][1]

    await eventually(ended)
    return found


async def test_with_redis_down_sending_works_and_resuming_is_unavailable(
    start_gateway: Callable[..., Any], tmp_path: Any, user: dict[str, str]
) -> None:
    with embedded_redis(tmp_path / "redis") as url:
        gateway_cm = start_gateway(redis_url=url, quota_fail_mode="open")
        gateway = await gateway_cm.__aenter__()
    try:  # the embedded Redis has stopped: every Redis call of this gateway now fails
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            chat_id = await new_chat(http, user)
            async with http.stream("POST", f"/v1/chats/{chat_id}/messages", headers=user,
                                   json={"content": "still there?"}) as response:
                events = [event async for event in read_events(response)]
            assert events[-1].event == "done" and text_of(events) == "still there?"
            refused = await http.get(f"/v1/chats/{chat_id}/stream", headers=user)
    finally:
        await gateway_cm.__aexit__(None, None, None)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "unavailable"


async def test_with_resuming_off_nothing_is_kept(start_gateway: Callable[..., Any], user: dict[str, str],
                                                 redis: Any) -> None:
    async with start_gateway(resumable=False) as a, httpx.AsyncClient(base_url=a.url, timeout=30) as client:
        assert a.services.streams.tapes is None
        chat_id = await new_chat(client, user, model="fake/echo?tokens=20&gap_ms=5")
        first = await read_first(client, f"/v1/chats/{chat_id}/messages", user,
                                 {"content": "gone with me", "on_disconnect": "continue"}, 2)
        status, _ = await resume(client, chat_id, user)
        assert status == 204
        prefix = a.services.settings.redis_prefix
        assert [key async for key in redis.scan_iter(match=f"{prefix}t:{{{chat_id}}}*")] == []
        # ``continue`` still holds: the turn ran to its end unread.
        message_id = first[0].json()["assistant_message_id"]
        await eventually(lambda: _status_is(db_of(a), message_id, "complete"))


def db_of(gateway: Gateway) -> Pool:
    return gateway.services.pool
