"""The gateway in front of real adapters (each SDK against its local vendor fake): cancellation, fallbacks,
and keys that never leak."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from providers.fake import FakeProvider
from providers.registry import ProviderRegistry
from storage.db import Pool
from tests.api.test_send import new_chat, next_delta, read_events, reply_row
from tests.conftest import Gateway, auth_headers
from tests.providers.test_adapters import SECRET, adapter_for
from tests.vendors import TEXT, TOKENS, VENDORS, VendorServer


@contextlib.asynccontextmanager
async def vendor_gateway(start_gateway: Any, vendors: dict[str, Any], **overrides: Any) -> AsyncIterator[Gateway]:
    registry = ProviderRegistry([FakeProvider(), *(adapter_for(v, vendors[v][1], idle_timeout_s=5) for v in VENDORS)])
    async with start_gateway(registry, retry_backoff_s=0, **overrides) as gateway:
        yield gateway


@pytest.mark.parametrize("vendor", VENDORS)
async def test_client_disconnect_closes_the_vendor_connection(
    start_gateway: Any, vendors: dict[str, Any], vendor: str, db: Pool
) -> None:
    server: VendorServer = vendors[vendor][0]
    marker = uuid.uuid4().hex[:8]
    headers = auth_headers("u-cancel", f"org-{marker}")
    async with vendor_gateway(start_gateway, vendors) as gateway, httpx.AsyncClient(base_url=gateway.url) as http:
        chat_id = await new_chat(http, headers, model=f"{vendor}/slow-{marker}")
        async with http.stream("POST", f"/v1/chats/{chat_id}/messages", headers=headers,
                               json={"content": "long please"}) as response:
            events = read_events(response)
            start = await anext(events)
            turn = gateway.services.streams.turns[uuid.UUID(chat_id)]
            for _ in range(3):
                await next_delta(events)
        hung_up = time.monotonic()
        await asyncio.wait_for(server.closed_event(marker).wait(), 0.5)
        assert server.closed[marker] - hung_up < 0.5
        await turn.finished()
    row = await reply_row(db, start.json()["assistant_message_id"])
    assert row["finish_reason"] == "client_disconnected" and row["content"].startswith("t0 t1 t2 ")


@pytest.mark.parametrize("vendor", VENDORS)
async def test_each_vendor_streams_through_the_chat_path(
    start_gateway: Any, vendors: dict[str, Any], vendor: str, db: Pool
) -> None:
    headers = auth_headers("u-route", f"org-{uuid.uuid4().hex[:6]}")
    async with vendor_gateway(start_gateway, vendors) as gateway, httpx.AsyncClient(base_url=gateway.url) as http:
        chat_id = await new_chat(http, headers, model=f"{vendor}/normal")
        async with http.stream("POST", f"/v1/chats/{chat_id}/messages", headers=headers,
                               json={"content": "hi"}) as response:
            events = [event async for event in read_events(response)]
    assert "".join(e.json()["text"] for e in events if e.event == "delta") == TEXT
    done = events[-1].json()
    assert done["usage"]["output_tokens"] == len(TOKENS) and done["finish_reason"] == "stop"
    row = await reply_row(db, done["assistant_message_id"])
    assert (row["content"], row["model"], row["usage_estimated"]) == (TEXT, f"{vendor}/normal", False)


async def test_fallback_answers_when_the_first_model_fails_before_any_token(
    start_gateway: Any, vendors: dict[str, Any], db: Pool
) -> None:
    openai_server: VendorServer = vendors["openai"][0]
    headers = auth_headers("u-fallback", f"org-{uuid.uuid4().hex[:6]}")
    fallbacks = {"openai/503": ["gemini/401", "anthropic/normal"]}
    async with vendor_gateway(start_gateway, vendors, fallbacks=fallbacks, retries=1) as gateway, \
            httpx.AsyncClient(base_url=gateway.url) as http:
        chat_id = await new_chat(http, headers, model="openai/503")
        before = len(openai_server.requests)
        response = await http.post(f"/v1/chats/{chat_id}/messages", headers={**headers, "Accept": "application/json"},
                                   json={"content": "anyone?"})
    assert response.status_code == 200
    reply = response.json()["assistant_message"]
    assert (reply["content"], reply["model"], reply["status"]) == (TEXT, "anthropic/normal", "complete")
    assert len(openai_server.requests) - before == 2  # the first try and one retry; then the fallbacks


async def test_failure_after_the_first_token_is_not_retried(
    start_gateway: Any, vendors: dict[str, Any], db: Pool
) -> None:
    openai_server: VendorServer = vendors["openai"][0]
    headers = auth_headers("u-noretry", f"org-{uuid.uuid4().hex[:6]}")
    async with vendor_gateway(start_gateway, vendors, fallbacks={"openai/error-frame": ["anthropic/normal"]},
                              retries=2) as gateway, httpx.AsyncClient(base_url=gateway.url) as http:
        chat_id = await new_chat(http, headers, model="openai/error-frame")
        before = len(openai_server.requests)
        async with http.stream("POST", f"/v1/chats/{chat_id}/messages", headers=headers,
                               json={"content": "go"}) as response:
            events = [event async for event in read_events(response)]
    assert [e.event for e in events] == ["start", "delta", "delta", "error"]
    assert len(openai_server.requests) - before == 1
    row = await reply_row(db, events[0].json()["assistant_message_id"])
    assert (row["content"], row["status"], row["model"]) == ("".join(TOKENS[:2]), "error", "openai/error-frame")


async def test_no_key_reaches_a_log_line_or_an_error_body(
    start_gateway: Any, vendors: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    headers = auth_headers("u-keys", f"org-{uuid.uuid4().hex[:6]}")
    bodies = []
    async with vendor_gateway(start_gateway, vendors, retries=0) as gateway, \
            httpx.AsyncClient(base_url=gateway.url) as http:
        for vendor in VENDORS:
            chat_id = await new_chat(http, headers, model=f"{vendor}/401")
            response = await http.post(f"/v1/chats/{chat_id}/messages", headers=headers, json={"content": "x"})
            assert response.status_code == 502
            assert response.json()["error"]["code"] == "upstream_auth_failed"
            bodies.append(response.text)
            ok = await new_chat(http, headers, model=f"{vendor}/normal")
            await http.post(f"/v1/chats/{ok}/messages", headers=headers, json={"content": "x"})
    logged = caplog.text + "".join(str(vars(record)) for record in caplog.records)
    for secret in SECRET.values():
        assert secret not in logged
        assert all(secret not in body for body in bodies)
    assert "sk-te" not in "".join(bodies)


async def test_a_streams_objects_are_freed_by_their_last_reference(
    start_gateway: Any, vendors: dict[str, Any]
) -> None:
    """However a stream ends, its objects do not wait for the cycle collector: with thousands of streams
    open, a full collection stops the worker for longer than a paced stream's gap."""
    marker = uuid.uuid4().hex[:8]
    headers = auth_headers("u-cycles", f"org-{marker}")
    streams = 0
    async with vendor_gateway(start_gateway, vendors) as gateway, httpx.AsyncClient(base_url=gateway.url) as http:
        chats = [await new_chat(http, headers, model=f"openai/{model}") for model in ("normal", f"slow-{marker}")]
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            async with http.stream("POST", f"/v1/chats/{chats[0]}/messages", headers=headers,
                                   json={"content": "all of it"}) as response:
                assert [event.event async for event in read_events(response)][-1] == "done"  # and stored
            async with http.stream("POST", f"/v1/chats/{chats[1]}/messages", headers=headers,
                                   json={"content": "hang up"}) as response:
                events = read_events(response)
                await next_delta(events)
                turn = gateway.services.streams.turns[uuid.UUID(chats[1])]
            async with http.stream("POST", "/v1/chat/completions", headers=headers, json={
                    "model": "openai/normal", "stream": True,
                    "messages": [{"role": "user", "content": "hi"}]}) as response:
                assert (await response.aread()).endswith(b"data: [DONE]\n\n")
            await turn.finished()
            del turn, response
            gc.collect()
            kinds = ("Turn", "EventStream", "Writer", "UpstreamCall", "RequestResponseCycle")
            streams = sum(type(o).__name__ in kinds for o in gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert streams == 0
