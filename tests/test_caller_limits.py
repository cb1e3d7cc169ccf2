"""What a signed-in caller cannot do: charge past max_tokens or a budget, steer a vendor request with a model
id, pass an unknown finish reason on, overspend an org's budget with concurrent sends, or get a 5xx other than
a 503 while PostgreSQL is down; each tried against a running gateway over real HTTP, PostgreSQL and Redis.

A failing turn's reservation and slot are held to account per vendor in tests/streaming/test_faults.py, the
quota scripts in tests/streaming/test_admission.py, identity-provider tokens in tests/edge/test_auth.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gateway.settings import Settings
from gateway.streaming.turns import GROW_BATCH
from storage.db import Pool
from tests.api.test_send import read_events, reply_row
from tests.conftest import auth_headers
from tests.servers import pipe
from tests.streaming.test_dispatch import vendor_gateway

JSON = {"Accept": "application/json"}


def caller(org: str | None = None) -> dict[str, str]:
    return auth_headers(f"u-{uuid.uuid4().hex[:6]}", org or f"org-{uuid.uuid4().hex[:6]}")


async def usage(http: httpx.AsyncClient, headers: dict[str, str]) -> dict[str, Any]:
    response = await http.get("/v1/usage", headers=headers)
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


async def test_the_fake_cannot_charge_past_max_tokens_or_a_users_budget(start_gateway: Any) -> None:
    """``fake/echo?tokens=200000`` with ``max_tokens: 10`` was admitted for a 5,000-token budget
    and charged 200,001 tokens. The fake now stops at max_tokens like a vendor (and refuses more than
    100,000 tokens: tests/providers/test_fake.py)."""
    headers = caller()
    async with start_gateway(quota_user_tokens=5000) as gateway, httpx.AsyncClient(base_url=gateway.url) as http:
        answer = await http.post("/v1/chat", headers={**headers, **JSON},
                                 json={"message": "hi", "model": "fake/echo?tokens=100000", "max_tokens": 10})
        assert answer.status_code == 200
        reply = answer.json()["assistant_message"]
        assert reply["usage"]["output_tokens"] == 10 and reply["finish_reason"] == "length"
        tokens = (await usage(http, headers))["user_tokens"]
    assert tokens["used"] <= 11 and tokens["reserved"] == 0


@pytest.mark.parametrize("model", ["gemini/x:countTokens?key=abc#", "gemini/../../v1/files", "gemini/x y",
                                   "gemini/a\x07b", "openai/./gpt-4o", "anthropic/"])
async def test_a_model_id_cannot_steer_a_vendor_request(
    start_gateway: Any, vendors: dict[str, Any], model: str
) -> None:
    """``gemini/x:countTokens?key=abc#`` made the gateway call another method with the operator's
    key, and ``../`` walked the path. Such ids are 404 ``model_not_found`` before anything is reserved, and
    no request leaves for the vendor."""
    headers = caller()
    server = vendors["gemini"][0]
    async with vendor_gateway(start_gateway, vendors, quota_user_tokens=1000) as gateway, \
            httpx.AsyncClient(base_url=gateway.url) as http:
        seen = len(server.requests)
        sent = await http.post("/v1/chat", headers=headers, json={"message": "hi", "model": model})
        completion = await http.post("/v1/chat/completions", headers=headers, json={
            "model": model, "messages": [{"role": "user", "content": "hi"}]})
        tokens = (await usage(http, headers))["user_tokens"]
    assert (sent.status_code, sent.json()["error"]["code"]) == (404, "model_not_found")
    assert (completion.status_code, completion.json()["error"]["code"]) == (404, "model_not_found")
    assert len(server.requests) == seen
    assert tokens["reserved"] == tokens["used"] == 0


async def test_a_model_id_reaches_the_vendor_url_as_one_escaped_segment(
    start_gateway: Any, vendors: dict[str, Any]
) -> None:
    """A model id that does not encode: ``gemini/€`` (the request line's encoding failed, and the turn kept its
    slot) is sent escaped, and the vendor's answer (here: no such scenario, a normal stream) is relayed."""
    server = vendors["gemini"][0]
    async with vendor_gateway(start_gateway, vendors) as gateway, httpx.AsyncClient(base_url=gateway.url) as http:
        answer = await http.post("/v1/chat", headers={**caller(), **JSON},
                                 json={"message": "hi", "model": "gemini/€:x"})
    assert answer.status_code == 200
    assert server.requests[-1]["path"] == "/v1beta/models/€:x:streamGenerateContent"  # as the vendor decodes it


async def test_an_unknown_finish_reason_reaches_neither_metrics_nor_the_store(start_gateway: Any) -> None:
    """``fake/echo?finish=anything`` put an unbounded label on /metrics and failed the
    database's check, leaving the reply ``streaming`` with no usage row. It is refused (422); the labels the
    metrics carry come from a closed set."""
    headers = caller()
    async with start_gateway() as gateway, httpx.AsyncClient(base_url=gateway.url) as http:
        refused = await http.post("/v1/chat", headers=headers,
                                  json={"message": "hi", "model": f"fake/echo?finish=x{uuid.uuid4().hex}"})
        metrics = (await http.get("/metrics")).text
    assert (refused.status_code, refused.json()["error"]["code"]) == (422, "validation_error")
    assert refused.json()["error"]["details"][0]["loc"] == ["model"]
    endings = {line.split('"')[1] for line in metrics.splitlines()
               if line.startswith("streamgate_stream_endings_total{")}
    assert endings <= {"stop", "length", "content_filter", "tool_calls", "cancelled", "client_disconnected",
                       "error", "interrupted"}


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_past_a_million_is_refused_on_every_path(
    client: httpx.AsyncClient, alice: dict[str, str], field: str
) -> None:
    """``max_tokens: 9223372036854775807`` on /v1/chat/completions failed the quota script (503)
    and left a float reservation in Redis."""
    completion = await client.post("/v1/chat/completions", headers=alice, json={
        "model": "fake/echo", "messages": [{"role": "user", "content": "hi"}], field: 9223372036854775807})
    chat = await client.post("/v1/chat", headers=alice, json={"message": "hi", "max_tokens": 1_000_001})
    report = (await client.get("/v1/usage", headers=alice)).json()
    assert completion.status_code == 422 and completion.json()["error"]["param"] == field
    assert chat.status_code == 422 and chat.json()["error"]["details"][0]["loc"] == ["max_tokens"]
    assert report["user_tokens"]["reserved"] == 0 and report["requests_per_minute"]["used"] == 0


async def test_a_reply_without_max_tokens_ends_when_the_budget_runs_out(start_gateway: Any, db: Pool) -> None:
    """with no ``max_tokens``, 1,024 tokens were reserved and the output ran on unbounded. The
    reservation grows as the answer streams; when the budget covers no more, the stream ends with
    ``error quota_exceeded`` and the partial is kept."""
    headers = caller()
    async with start_gateway(quota_user_tokens=2000, quota_default_max_tokens=300) as gateway, \
            httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        async with http.stream("POST", "/v1/chat", headers=headers,
                               json={"message": "a b c d", "model": "fake/echo?tokens=20000"}) as response:
            events = [event async for event in read_events(response)]
        tokens = (await usage(http, headers))["user_tokens"]
    start, last = events[0].json(), events[-1]
    assert (last.event, last.json()["code"]) == ("error", "quota_exceeded")
    text = "".join(event.json()["text"] for event in events if event.event == "delta")
    row = await reply_row(db, start["assistant_message_id"])
    assert row["content"] == text and row["status"] == "error" and text
    assert tokens["reserved"] == 0
    assert tokens["used"] <= 2000 + GROW_BATCH


async def test_fifty_sends_at_an_orgs_budget_overspend_it_by_at_most_a_batch_each(start_gateway: Any) -> None:
    """Under concurrency: an org at its budget, 50 sends without ``max_tokens`` at once."""
    org = f"org-{uuid.uuid4().hex[:6]}"
    budget = 20_000
    async with start_gateway(quota_org_tokens=budget, quota_default_max_tokens=300) as gateway, \
            httpx.AsyncClient(base_url=gateway.url, timeout=60,
                              limits=httpx.Limits(max_connections=60)) as http:
        async def send() -> int:
            response = await http.post("/v1/chat", headers={**caller(org), **JSON},
                                       json={"message": "w x y z", "model": "fake/echo?tokens=5000&gap_ms=1"})
            return response.status_code

        statuses = await asyncio.gather(*(send() for _ in range(50)))
        tokens = (await usage(http, caller(org)))["org_tokens"]
    assert set(statuses) <= {200, 429} and 200 in statuses
    assert tokens["reserved"] == 0
    assert tokens["used"] <= budget + 50 * GROW_BATCH


@contextlib.asynccontextmanager
async def cuttable_proxy(target: str) -> AsyncIterator[tuple[str, asyncio.Event]]:
    """A TCP proxy to the PostgreSQL that ``target`` (a URL) names; yields the URL through it and an event
    that, once set, closes every connection and refuses new ones: PostgreSQL gone, as a client sees it."""
    parts = urllib.parse.urlsplit(target)
    socket_dir = urllib.parse.parse_qs(parts.query).get("host", [""])[0]
    cut = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if cut.is_set():
            writer.close()
            return
        if socket_dir.startswith("/"):
            up_reader, up_writer = await asyncio.open_unix_connection(f"{socket_dir}/.s.PGSQL.{parts.port or 5432}")
        else:
            up_reader, up_writer = await asyncio.open_connection(parts.hostname, parts.port or 5432)
        writers.extend((writer, up_writer))
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    netloc = f"{parts.username or 'postgres'}{':' + parts.password if parts.password else ''}@127.0.0.1:{port}"
    query = "&".join(f"{k}={v}" for k, v in urllib.parse.parse_qsl(parts.query) if k != "host")
    proxied = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))

    async def cutter() -> None:
        await cut.wait()
        server.close()
        for writer in writers:
            writer.transport.abort()

    task = asyncio.create_task(cutter())
    try:
        yield proxied, cut
    finally:
        cut.set()
        await task
        server.close()


async def test_postgres_down_is_a_503_with_retry_after_on_every_route(
    start_gateway: Any, settings: Settings, alice: dict[str, str]
) -> None:
    """A store that is down is an outage, not a bug: 503 ``unavailable`` with ``Retry-After`` (it was a
    500 ``internal_error``)."""
    assert settings.database_url is not None
    async with cuttable_proxy(settings.database_url) as (url, cut), start_gateway(database_url=url) as gateway, \
            httpx.AsyncClient(base_url=gateway.url) as http:
        chat_id = (await http.post("/v1/chats", headers=alice, json={})).json()["id"]
        await usage(http, alice)  # the limits are now cached in Redis: admissions need no PostgreSQL
        cut.set()
        answers = [
            await http.get("/v1/chats", headers=alice),
            await http.post("/v1/chats", headers=alice, json={}),
            await http.get(f"/v1/chats/{chat_id}", headers=alice),
            await http.post(f"/v1/chats/{chat_id}/messages", headers=alice, json={"content": "hi"}),
            await http.post("/v1/chat", headers=alice, json={"message": "hi"}),
            await http.get("/v1/stats", headers=alice),
        ]
        usage_after = (await http.get("/v1/usage", headers=alice)).json()
    assert [(a.status_code, a.json()["error"]["code"]) for a in answers] == [(503, "unavailable")] * len(answers)
    assert all(a.headers["retry-after"] == "1" for a in answers)
    assert usage_after["user_tokens"]["reserved"] == 0 and usage_after["concurrent_streams"]["active"] == 0



async def test_a_deployment_can_remove_the_fake_provider(start_gateway: Any) -> None:
    """The fake's switch: ``GATEWAY_FAKE_PROVIDER=false`` (compose.yaml sets it) leaves no keyless model."""
    headers = caller()
    async with start_gateway(fake_provider=False) as gateway, httpx.AsyncClient(base_url=gateway.url) as http:
        sent = await http.post("/v1/chat", headers=headers, json={"message": "hi", "model": "fake/echo"})
        models = (await http.get("/v1/models", headers=headers)).json()["data"]
    assert (sent.status_code, sent.json()["error"]["code"]) == (404, "model_not_found")
    assert not [model for model in models if model["id"].startswith("fake/")]
