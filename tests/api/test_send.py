"""The streaming send path over real HTTP, PostgreSQL and Redis.

Past 400 lines because the send path is the gateway's main story: every way a turn starts and ends.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import httpx_sse
import pytest
from prometheus_client import REGISTRY

from gateway.app import create_app
from gateway.settings import Settings
from providers.fake import FakeOptions
from storage.db import Pool
from tests.conftest import Gateway, auth_headers
from tests.servers import serve_app

SLOW = "fake/echo?tokens=400&gap_ms=20"


async def new_chat(client: httpx.AsyncClient, headers: dict[str, str], **body: Any) -> str:
    response = await client.post("/v1/chats", headers=headers, json=body)
    assert response.status_code == 201
    return str(response.json()["id"])


async def read_events(response: httpx.Response) -> AsyncIterator[httpx_sse.ServerSentEvent]:
    async for event in httpx_sse.EventSource(response).aiter_sse():
        yield event


async def next_delta(stream: AsyncIterator[httpx_sse.ServerSentEvent]) -> httpx_sse.ServerSentEvent:
    """The stream's next delta. Keep ``stream`` referenced for as long as the reply should run: an event
    iterator dropped is finalized, and closing it closes the connection, which the gateway sees as the
    client hanging up (a stop sent right after raced that hang-up and lost, now and then)."""
    async for event in stream:
        if event.event == "delta":
            return event
    raise AssertionError("the stream ended before a delta")


async def reply_row(db: Pool, message_id: str) -> asyncpg.Record:
    row = await db.fetchrow("SELECT * FROM messages WHERE id = $1", uuid.UUID(message_id))
    assert row is not None
    return row


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10) -> None:
    """Wait until ``check`` holds (for state only another process can change), failing after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_full_stream_is_parsed_stored_and_titles_the_chat(
    client: httpx.AsyncClient, alice: dict[str, str], db: Pool
) -> None:
    chat_id = await new_chat(client, alice)
    message = "Explain   the difference between a process and a thread, please"
    async with client.stream(
        "POST", f"/v1/chats/{chat_id}/messages", headers=alice, json={"content": message}
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        events = [event async for event in read_events(response)]
    names = [event.event for event in events]
    assert names[0] == "start" and names[-2:] == ["usage", "done"]
    assert set(names[1:-2]) == {"delta"}
    assert [event.id for event in events] == [str(n) for n in range(1, len(events) + 1)]
    start, done = events[0].json(), events[-1].json()
    assert start["chat_id"] == chat_id and start["model"] == "fake/echo"
    text = "".join(event.json()["text"] for event in events if event.event == "delta")
    assert text == message
    assert done["finish_reason"] == "stop"
    assert done["usage"]["output_tokens"] == len(names) - 3
    row = await reply_row(db, start["assistant_message_id"])
    assert (row["content"], row["status"], row["finish_reason"]) == (text, "complete", "stop")
    assert row["output_tokens"] == done["usage"]["output_tokens"] and not row["usage_estimated"]
    assert row["metadata"]["duration_ms"] >= 0
    user = await reply_row(db, start["user_message_id"])
    assert (user["role"], user["content"]) == ("user", message)
    chat = (await client.get(f"/v1/chats/{chat_id}", headers=alice)).json()
    assert chat["title"] == "Explain the difference between a process and a thread, please"
    assert [m["role"] for m in chat["messages"]] == ["user", "assistant"]


@pytest.mark.parametrize("named", [{}, {"model": "fake/echo"}], ids=["chat's model", "model named"])
async def test_history_reaches_the_provider(
    client: httpx.AsyncClient, alice: dict[str, str], gateway: Gateway, named: dict[str, str]
) -> None:
    """A turn that names its model is written while its chat is read: the read leaves its message out."""
    chat_id = await new_chat(client, alice, system_prompt="be terse")
    for content in ("first", "second"):
        response = await client.post(
            f"/v1/chats/{chat_id}/messages",
            headers={**alice, "Accept": "application/json"},
            json={"content": content, **named},
        )
        assert response.json()["assistant_message"]["content"] == content
    # The fake reports input usage from the whole prompt: system + two earlier turns + the new message.
    third = await client.post(
        f"/v1/chats/{chat_id}/messages",
        headers={**alice, "Accept": "application/json"},
        json={"content": "third", **named},
    )
    prompt_chars = len("be terse") + len("first") * 2 + len("second") * 2 + len("third")
    assert third.json()["assistant_message"]["usage"]["input_tokens"] == prompt_chars // 4


async def test_json_answer_holds_both_messages(client: httpx.AsyncClient, alice: dict[str, str]) -> None:
    response = await client.post(
        "/v1/chat", headers={**alice, "Accept": "application/json"}, json={"message": "hi there"}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["user_message"]["content"] == "hi there"
    assert body["assistant_message"]["content"] == "hi there"
    assert body["assistant_message"]["status"] == "complete"
    assert body["assistant_message"]["chat_id"] == body["chat_id"]


async def test_a_new_chat_whose_first_turn_is_refused_is_not_made(start_gateway: Any) -> None:
    headers = auth_headers(f"u-{uuid.uuid4().hex[:6]}", f"org-{uuid.uuid4().hex[:6]}")
    async with start_gateway(quota_user_tokens=100_000) as gateway, httpx.AsyncClient(base_url=gateway.url) as client:
        refusals = [
            ({"message": "x", "max_tokens": 1_000_000}, 429, "quota_exceeded"),
            ({"message": "x", "attachments": [{"file_id": str(uuid.uuid4())}]}, 404, "file_not_found"),
        ]
        for body, status, code in refusals:
            refused = await client.post("/v1/chat", headers=headers, json=body)
            assert (refused.status_code, refused.json()["error"]["code"]) == (status, code)
        listed = await client.get("/v1/chats", headers=headers)
        assert listed.json()["total"] == 0
        made = await client.post("/v1/chat", headers={**headers, "Accept": "application/json"}, json={"message": "hi"})
        assert made.status_code == 200
        assert [chat["id"] for chat in (await client.get("/v1/chats", headers=headers)).json()["items"]] \
            == [made.json()["chat_id"]]


async def test_a_reply_of_millions_of_characters_is_stored_whole(
    client: httpx.AsyncClient, alice: dict[str, str], db: Pool
) -> None:
    word = "w" * 10_000  # max_tokens bounds a reply in tokens, not in characters: a token can be long
    answer = await client.post("/v1/chat", headers={**alice, "Accept": "application/json"},
                               json={"message": word, "model": "fake/echo?tokens=300"})
    assert answer.status_code == 200, answer.text[:300]
    reply = answer.json()["assistant_message"]
    assert reply["status"] == "complete" and len(reply["content"]) > 3_000_000
    row = await reply_row(db, reply["id"])
    assert row["content"] == reply["content"]


async def test_client_disconnect_closes_the_provider_and_keeps_what_was_sent(
    client: httpx.AsyncClient, alice: dict[str, str], db: Pool, gateway: Gateway
) -> None:
    prompt = f"disconnect {uuid.uuid4().hex} now"
    chat_id = await new_chat(client, alice, model=SLOW)
    delivered = []
    async with client.stream(
        "POST", f"/v1/chats/{chat_id}/messages", headers=alice, json={"content": prompt}
    ) as r:
        async for event in read_events(r):
            if event.event == "start":
                message_id = event.json()["assistant_message_id"]
                turn = gateway.services.streams.turns[uuid.UUID(chat_id)]
            elif event.event == "delta":
                delivered.append(event.json()["text"])
                if len(delivered) == 5:
                    break
        hung_up = time.monotonic()
    record = gateway.fake.find(prompt)
    await asyncio.wait_for(record.closed.wait(), 0.5)
    assert record.closed_at is not None and record.closed_at - hung_up < 0.5
    assert record.outcome == "closed"
    await turn.finished()
    row = await reply_row(db, message_id)
    assert (row["status"], row["finish_reason"]) == ("cancelled", "client_disconnected")
    full = "".join(gateway.fake.tokens_for(prompt, __import__("providers.fake").fake.FakeOptions(tokens=400)))
    assert row["content"].startswith("".join(delivered)) and full.startswith(row["content"])
    assert len(row["content"]) >= len("".join(delivered))
    assert row["usage_estimated"]  # the provider never got to report usage


async def test_a_stream_is_logged_once_when_it_ends(
    client: httpx.AsyncClient, alice: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    chat_id = await new_chat(client, alice, model="fake/echo?tokens=20&gap_ms=5")

    def lines(request_id: str) -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "gateway.access" and vars(r).get("request_id") == request_id]

    async with client.stream("POST", f"/v1/chats/{chat_id}/messages", headers=alice, json={"content": "a"}) as r:
        request_id = r.headers["x-request-id"]
        stream = read_events(r)
        await next_delta(stream)
        assert lines(request_id) == []  # the stream has started, not ended
        events = [event async for event in stream]
    assert events[-1].event == "done"
    await eventually(lambda: _true(len(lines(request_id)) == 1))
    (line,) = lines(request_id)
    assert vars(line)["status"] == 200 and vars(line)["user"] == owner_id(alice)


async def test_a_running_stream_holds_no_middleware_frames(
    client: httpx.AsyncClient, alice: dict[str, str], gateway: Gateway
) -> None:
    # Each suspended layer of the stack costs memory for as long as the stream lasts.
    chat_id = await new_chat(client, alice, model=SLOW)
    async with client.stream("POST", f"/v1/chats/{chat_id}/messages", headers=alice, json={"content": "a"}) as r:
        events = read_events(r)
        await next_delta(events)
        (turn,) = [t for t in gateway.services.streams.running if t.ids and str(t.ids.chat_id) == chat_id]
        task = turn._wake.__self__.task  # type: ignore[union-attr]
        files, coro = [], task.get_coro()
        while hasattr(coro, "cr_code"):  # down to the future it waits on
            files.append(f"{coro.cr_code.co_filename}:{coro.cr_code.co_qualname}")
            coro = coro.cr_await
        assert any("gateway/streaming/sse.py:EventStream" in f for f in files)
        assert not [f for f in files if "starlette" in f or "gateway/edge/middleware.py:Request" in f], files
        await client.post(f"/v1/chats/{chat_id}/stop", headers=alice)


@pytest.mark.parametrize(("http", "direct"), [("httptools", True), ("h11", False)])
async def test_frames_reach_the_client_under_either_http_server(
    settings: Settings, db: Pool, http: str, direct: bool
) -> None:
    # Under httptools frames are written to the transport directly; under h11 they take the ASGI send.
    headers = auth_headers(f"u-{uuid.uuid4().hex[:6]}", "org-http")
    app = create_app(settings)
    async with serve_app(app, http=http) as url, httpx.AsyncClient(base_url=url) as client:
        chat_id = await new_chat(client, headers, model="fake/echo?tokens=30&gap_ms=2")
        async with client.stream("POST", f"/v1/chats/{chat_id}/messages", headers=headers,
                                 json={"content": "one two three"}) as r:
            stream = read_events(r)
            first = await next_delta(stream)
            (turn,) = [t for t in app.state.services.streams.running if t.ids and str(t.ids.chat_id) == chat_id]
            assert (turn._wake.__self__.out.cycle is not None) is direct  # type: ignore[union-attr]
            events = [first, *[event async for event in stream]]
        done = events[-1].json()
        text = "".join(event.json()["text"] for event in events if event.event == "delta")
        assert events[-1].event == "done" and done["finish_reason"] == "stop"
        row = await reply_row(db, done["assistant_message_id"])
        assert row["content"] == text and len(text) > 0


async def _true(value: bool) -> bool:
    return value


def owner_id(headers: dict[str, str]) -> str:
    import jwt

    return str(jwt.decode(headers["Authorization"].split()[1], options={"verify_signature": False})["sub"])


async def test_checkpoints_append_the_text_streamed_since_the_last(
    client: httpx.AsyncClient, alice: dict[str, str], gateway: Gateway, db: Pool
) -> None:
    prompt = "checkpoint one two three four"
    chat_id = await new_chat(client, alice, model=SLOW)
    async with client.stream("POST", f"/v1/chats/{chat_id}/messages", headers=alice, json={"content": prompt}) as r:
        stream = read_events(r)
        message_id = (await anext(stream)).json()["assistant_message_id"]
        seen: list[str] = []

        async def grew_three_times() -> bool:
            content = (await reply_row(db, message_id))["content"]
            if content and (not seen or content != seen[-1]):
                seen.append(content)
            return len(seen) >= 3

        await eventually(grew_three_times)
        await client.post(f"/v1/chats/{chat_id}/stop", headers=alice)
        async for _ in stream:
            pass
    full = "".join(gateway.fake.tokens_for(prompt, FakeOptions(tokens=400)))
    for earlier, later in itertools.pairwise(seen):
        assert later.startswith(earlier) and len(later) > len(earlier)
    assert all(full.startswith(content) for content in seen), seen  # no piece lost or written twice


async def test_second_send_while_streaming_gets_409(
    client: httpx.AsyncClient, alice: dict[str, str], gateway: Gateway
) -> None:
    chat_id = await new_chat(client, alice, model=SLOW)
    async with client.stream(
        "POST", f"/v1/chats/{chat_id}/messages", headers=alice, json={"content": "a b"}
    ) as r:
        stream = read_events(r)  # one iterator throughout: abandoning one closes the connection
        await next_delta(stream)
        second = await client.post(f"/v1/chats/{chat_id}/messages", headers=alice, json={"content": "again"})
        assert second.status_code == 409
        assert second.json()["error"]["code"] == "stream_already_active"
        stop = await client.post(f"/v1/chats/{chat_id}/stop", headers=alice)
        assert stop.json() == {"stopped": True}
        events = [event async for event in stream]
    assert events[-1].event == "done" and events[-1].json()["finish_reason"] == "cancelled"
    after = await client.post(
        f"/v1/chats/{chat_id}/messages",
        headers={**alice, "Accept": "application/json"},
        json={"content": "free again", "model": "fake/echo"},
    )
    assert after.status_code == 200


async def test_a_refused_lease_or_admission_holds_nothing(start_gateway: Any) -> None:
    # The admission and the chat's lease are taken in one script: a refusal of either takes neither.
    headers = auth_headers(f"u-{uuid.uuid4().hex[:6]}", f"org-{uuid.uuid4().hex[:6]}")
    async with start_gateway(quota_max_concurrent_streams=2, quota_user_tokens=100_000) as gateway, \
            httpx.AsyncClient(base_url=gateway.url) as client:
        busy, other = await new_chat(client, headers, model=SLOW), await new_chat(client, headers)
        async with client.stream("POST", f"/v1/chats/{busy}/messages", headers=headers,
                                 json={"content": "a b"}) as r:
            stream = read_events(r)
            await next_delta(stream)
            again = await client.post(f"/v1/chats/{busy}/messages", headers=headers, json={"content": "x"})
            assert again.json()["error"]["code"] == "stream_already_active"
            too_big = await client.post(f"/v1/chats/{other}/messages", headers=headers,
                                        json={"content": "x", "max_tokens": 1_000_000})
            assert too_big.json()["error"]["code"] == "quota_exceeded"
            # A slot leaked by the 409 would make this too_many_streams; a lease leaked by the 429, a 409.
            ok = await client.post(f"/v1/chats/{other}/messages", headers={**headers, "Accept": "application/json"},
                                   json={"content": "x", "model": "fake/echo"})
            assert ok.status_code == 200, ok.text
            await client.post(f"/v1/chats/{busy}/stop", headers=headers)


async def test_stop_with_nothing_running_is_404(client: httpx.AsyncClient, alice: dict[str, str]) -> None:
    chat_id = await new_chat(client, alice)
    response = await client.post(f"/v1/chats/{chat_id}/stop", headers=alice)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "stream_not_found"


async def test_other_tenants_cannot_send_or_stop(
    client: httpx.AsyncClient, alice: dict[str, str], db: Pool
) -> None:
    chat_id = await new_chat(client, alice)
    for intruder in (auth_headers("mallory", "org-x"), auth_headers("mallory", "org-y")):
        for path, body in (
            (f"/v1/chats/{chat_id}/messages", {"content": "hi"}),
            (f"/v1/chats/{chat_id}/stop", None),
            ("/v1/chat", {"message": "hi", "chat_id": chat_id}),
        ):
            response = await client.post(path, headers=intruder, json=body)
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "chat_not_found"
    assert await db.fetchval("SELECT count(*) FROM messages WHERE chat_id = $1", uuid.UUID(chat_id)) == 0


@pytest.mark.parametrize(
    "body",
    [
        {"content": ""},
        {"content": "   \n"},
        {"content": "x" * 10_001},
        {"content": 5},
        {},
        {"content": "hi", "model": "fake/echo?tokens=-1"},
        {"content": "hi", "temperature": 9},
        {"content": "hi", "max_tokens": 0},
        {"content": "hi", "surprise": 1},
    ],
    ids=[
        "empty",
        "blank",
        "too-long",
        "not-text",
        "missing",
        "bad-model-options",
        "temperature",
        "max-tokens",
        "unknown-field",
    ],
)
async def test_bad_message_is_422_and_stores_nothing(
    client: httpx.AsyncClient, alice: dict[str, str], db: Pool, body: dict[str, Any]
) -> None:
    chat_id = await new_chat(client, alice)
    response = await client.post(f"/v1/chats/{chat_id}/messages", headers=alice, json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "validation_error"
    assert await db.fetchval("SELECT count(*) FROM messages WHERE chat_id = $1", uuid.UUID(chat_id)) == 0
    assert (await client.post(f"/v1/chats/{chat_id}/stop", headers=alice)).status_code == 404


@pytest.mark.parametrize("model", ["nobody/knows", "fake/nothing", "gemini/x?y"])
async def test_a_model_no_provider_serves_is_404_and_stores_nothing(
    client: httpx.AsyncClient, alice: dict[str, str], db: Pool, model: str
) -> None:
    chat_id = await new_chat(client, alice)
    response = await client.post(f"/v1/chats/{chat_id}/messages", headers=alice, json={"content": "hi", "model": model})
    assert (response.status_code, response.json()["error"]["code"]) == (404, "model_not_found")
    assert await db.fetchval("SELECT count(*) FROM messages WHERE chat_id = $1", uuid.UUID(chat_id)) == 0


async def test_provider_failure_mid_stream_sends_one_error_and_keeps_the_partial(
    client: httpx.AsyncClient, alice: dict[str, str], db: Pool
) -> None:
    chat_id = await new_chat(client, alice, model="fake/echo?fail_after=3&fail=500")
    async with client.stream(
        "POST", f"/v1/chats/{chat_id}/messages", headers=alice, json={"content": "one two three four five"}
    ) as response:
        events = [event async for event in read_events(response)]
    assert [event.event for event in events] == ["start", "delta", "delta", "delta", "error"]
    assert events[-1].json() == {
        "code": "upstream_error",
        "message": "The fake provider failed with status 500",
    }
    row = await reply_row(db, events[0].json()["assistant_message_id"])
    assert (row["content"], row["status"], row["finish_reason"]) == ("one two three ", "error", "error")
    assert row["metadata"]["error"]["code"] == "upstream_error"


@pytest.mark.parametrize(
    ("fail", "status", "code"),
    [
        ("500", 502, "upstream_error"),
        ("timeout", 504, "upstream_timeout"),
        ("401", 502, "upstream_auth_failed"),
    ],
)
async def test_provider_failure_before_first_token_is_json_and_keeps_the_message(
    client: httpx.AsyncClient, alice: dict[str, str], db: Pool, fail: str, status: int, code: str
) -> None:
    chat_id = await new_chat(client, alice, model=f"fake/echo?fail_after=0&fail={fail}")
    response = await client.post(f"/v1/chats/{chat_id}/messages", headers=alice, json={"content": "kept"})
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == code
    rows = await db.fetch(
        "SELECT role, content, status FROM messages WHERE chat_id = $1 ORDER BY seq", uuid.UUID(chat_id)
    )
    assert [tuple(row) for row in rows] == [("user", "kept", "complete"), ("assistant", "", "error")]
    again = await client.post(
        f"/v1/chats/{chat_id}/messages", headers=alice, json={"content": "retry", "model": "fake/echo"}
    )
    assert again.status_code == 200


async def test_send_to_a_deleted_chat_is_404(client: httpx.AsyncClient, alice: dict[str, str]) -> None:
    chat_id = await new_chat(client, alice)
    await client.delete(f"/v1/chats/{chat_id}", headers=alice)
    response = await client.post(f"/v1/chats/{chat_id}/messages", headers=alice, json={"content": "hello?"})
    assert response.status_code == 404


def test_title_is_cut_on_a_word_boundary() -> None:
    from gateway.api.send import title_from

    long = "word " * 30
    assert title_from(long) == ("word " * 16).strip()
    assert len(title_from("x" * 200)) == 80
    assert title_from("  spaced \n\t out  ") == "spaced out"


async def test_quiet_stream_gets_ping_comments(start_gateway: Any, alice: dict[str, str]) -> None:
    async with start_gateway(ping_s=0.05) as pinging, httpx.AsyncClient(base_url=pinging.url) as http:
        chat_id = await new_chat(http, alice, model="fake/echo?gap_ms=300")
        async with http.stream(
            "POST", f"/v1/chats/{chat_id}/messages", headers=alice, json={"content": "slow words"}
        ) as response:
            raw = b"".join([chunk async for chunk in response.aiter_bytes()])
    frames = raw.split(b"\n\n")
    assert b": ping" in frames
    assert all(frame.startswith((b"id: ", b": ping")) for frame in frames if frame)


async def test_frozen_client_cannot_hold_a_stream(
    start_gateway: Any, alice: dict[str, str], db: Pool
) -> None:
    async with start_gateway(send_timeout_s=0.5) as gateway, httpx.AsyncClient(base_url=gateway.url) as http:
        chat_id = await new_chat(http, alice, model="fake/echo?tokens=100000")  # the fake's largest reply
        host, port = gateway.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        body = b'{"content": "flood the pipe"}'  # 100,000 tokens: 5 MB of events, past the socket's buffers
        writer.write(
            f"POST /v1/chats/{chat_id}/messages HTTP/1.1\r\nHost: x\r\nAuthorization: {alice['Authorization']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        await reader.readuntil(b"event: start")  # then read nothing more: the client is frozen
        turn = gateway.services.streams.turns[uuid.UUID(chat_id)]
        await asyncio.wait_for(turn.finished(), 30)
        writer.close()
    row = await reply_row(db, str(turn.ids.assistant_message_id))
    assert (row["status"], row["finish_reason"]) == ("cancelled", "client_disconnected")
    assert 0 < len(row["content"]) < len("flood ") * 100_000


async def test_a_turn_whose_message_cannot_be_stored_leaves_nothing_behind(
    client: httpx.AsyncClient, alice: dict[str, str], db: Pool, gateway: Gateway
) -> None:
    # The provider is called while the message is written; when the write fails, the provider call is
    # closed, nothing is stored or charged, and the chat is free again. A trigger makes the write fail.
    prompt = f"unstorable {uuid.uuid4().hex}"
    await db.execute(f"""
        CREATE OR REPLACE FUNCTION refuse_unstorable() RETURNS trigger AS $$
        BEGIN
            IF NEW.content = '{prompt}' THEN RAISE EXCEPTION 'refused by the test'; END IF;
            RETURN NEW;
        END $$ LANGUAGE plpgsql;
        CREATE OR REPLACE TRIGGER refuse_unstorable BEFORE INSERT ON messages
            FOR EACH ROW EXECUTE FUNCTION refuse_unstorable();
    """)
    active = REGISTRY.get_sample_value("streamgate_active_streams")
    try:
        chat_id = await new_chat(client, alice, model="fake/echo?ttft_ms=2000")
        response = await client.post(f"/v1/chats/{chat_id}/messages", headers=alice, json={"content": prompt})
    finally:
        await db.execute("DROP TRIGGER refuse_unstorable ON messages; DROP FUNCTION refuse_unstorable()")
    assert response.status_code == 500
    assert REGISTRY.get_sample_value("streamgate_active_streams") == active
    assert response.json()["error"]["code"] == "internal_error"
    record = gateway.fake.find(prompt)
    await asyncio.wait_for(record.closed.wait(), 0.5)
    assert (record.outcome, record.tokens_sent) == ("closed", 0)
    assert await db.fetchval("SELECT count(*) FROM messages WHERE chat_id = $1", uuid.UUID(chat_id)) == 0
    usage = (await client.get("/v1/usage", headers=alice)).json()
    assert usage["user_tokens"]["used"] == 0 and usage["concurrent_streams"]["active"] == 0
    again = await client.post(f"/v1/chats/{chat_id}/messages", headers=alice,
                              json={"content": "stored", "model": "fake/echo"})
    assert again.status_code == 200
