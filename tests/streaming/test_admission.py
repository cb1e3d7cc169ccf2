"""Quotas on real Redis and PostgreSQL: exact under concurrency, settled to real usage, clock injected.

Past 400 lines because each quota rule is held under concurrency on the real stores, each with its own clock and load.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from gateway.edge.errors import GatewayError
from gateway.embedded import embedded_redis
from gateway.settings import Settings
from gateway.streaming.admission import QuotaGuard
from providers.fake import FakeProvider
from providers.registry import ProviderRegistry
from storage.db import Pool
from storage.quotas import Lease, QuotaDefaults, QuotaStore
from storage.usage import QuotaOverride, get_override, put_override
from tests.api.test_send import new_chat, next_delta, read_events
from tests.conftest import JWT_SECRET, auth_headers
from tests.edge.test_metrics import sample
from tests.servers import gateway_process

INSERT_TURNS = 'streamgate_backend_call_seconds_count{backend="postgres",call="insert_turn"}'


class Clock:
    def __init__(self, moment: datetime) -> None:
        self.now = moment.timestamp()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def subject() -> tuple[str, str]:
    return f"org-{uuid.uuid4().hex[:8]}", f"user-{uuid.uuid4().hex[:8]}"


StoreFor = Callable[..., QuotaStore]


@pytest.fixture
async def store_for(redis: Redis, db: Pool, settings: Settings) -> AsyncIterator[StoreFor]:
    """Quota stores on a test clock, closed after the test."""
    async def load(org_id: str, scope: str, subject_id: str) -> QuotaOverride | None:
        return await get_override(db, org_id, scope, subject_id)

    stores: list[QuotaStore] = []

    def make(clock: Clock, **defaults: Any) -> QuotaStore:
        stores.append(QuotaStore(redis, settings.redis_prefix, QuotaDefaults(**defaults), 30, load, clock=clock))
        return stores[-1]

    yield make
    for store in stores:
        await store.aclose()


async def test_budget_refuses_then_resets_at_the_utc_day_boundary(
    store_for: StoreFor, subject: tuple[str, str]
) -> None:
    clock = Clock(datetime(2026, 3, 9, 23, 59, 0, tzinfo=UTC))
    store = store_for(clock, user_tokens=250)
    first = await store.reserve(*subject, "s1", 100)
    assert first.admitted and first.tokens_remaining == 150 and first.token_limit == 250
    assert first.ticket is not None
    await store.settle(first.ticket, 120)
    second = await store.reserve(*subject, "s2", 100)
    assert second.admitted and second.tokens_remaining == 30
    refused = await store.reserve(*subject, "s3", 100)
    assert refused.code == "quota_exceeded"
    assert refused.retry_after_s == 60  # until midnight UTC
    clock.now += 60
    assert (await store.reserve(*subject, "s4", 100)).admitted  # a new day


async def test_month_period_override_resets_at_the_month_boundary(
    store_for: StoreFor, db: Pool, subject: tuple[str, str]
) -> None:
    org, user = subject
    await put_override(db, org, "user", user, QuotaOverride(tokens_per_period=100, period="month"))
    clock = Clock(datetime(2026, 2, 28, 12, 0, 0, tzinfo=UTC))
    store = store_for(clock)
    ticket = (await store.reserve(org, user, "m1", 100)).ticket
    assert ticket is not None
    await store.settle(ticket, 100)
    refused = await store.reserve(org, user, "m2", 1)
    assert refused.code == "quota_exceeded" and refused.retry_after_s == 12 * 3600
    clock.now += 24 * 3600  # 1 March: still refused on a daily budget would pass; the monthly one resets
    assert (await store.reserve(org, user, "m3", 1)).admitted


async def test_requests_per_minute_slide(store_for: StoreFor, subject: tuple[str, str]) -> None:
    clock = Clock(datetime(2026, 5, 1, 10, 0, 0, tzinfo=UTC))
    store = store_for(clock, requests_per_minute=3)
    for n in range(3):
        decision = await store.reserve(*subject, f"r{n}", 1)
        assert decision.admitted and decision.requests_remaining == 2 - n
        clock.now += 10
    refused = await store.reserve(*subject, "r3", 1)
    assert refused.code == "rate_limited"
    assert refused.retry_after_s == 30  # the first request leaves the window 60 s after it was made
    clock.now += 30
    assert (await store.reserve(*subject, "r4", 1)).admitted


async def test_concurrency_slots_are_freed_by_settlement_or_by_expiry(
    store_for: StoreFor, subject: tuple[str, str]
) -> None:
    clock = Clock(datetime(2026, 5, 1, 10, 0, 0, tzinfo=UTC))
    store = store_for(clock, max_concurrent_streams=2, user_tokens=1000)
    a = await store.reserve(*subject, "a", 400)
    b = await store.reserve(*subject, "b", 400)
    assert a.ticket and b.ticket
    assert (await store.reserve(*subject, "c", 1)).code == "too_many_streams"
    await store.settle(a.ticket, 10)
    assert (await store.reserve(*subject, "d", 1)).admitted
    # "b" and "d" belong to a crashed instance: nobody renews or settles them; they lapse, reservations too.
    clock.now += 31
    decision = await store.reserve(*subject, "e", 900)
    assert decision.admitted and decision.tokens_remaining == 1000 - 10 - 900  # "d" lapsed as well


async def test_renewal_keeps_a_long_stream_alive(
    store_for: StoreFor, subject: tuple[str, str], redis: Redis
) -> None:
    clock = Clock(datetime(2026, 5, 1, 10, 0, 0, tzinfo=UTC))
    store = store_for(clock, max_concurrent_streams=1)
    lease = Lease(store.lease_key(subject[0], "chat"), "instance long", 5_000)
    ticket = (await store.reserve(*subject, "long", 1, lease)).ticket
    assert ticket is not None
    for _ in range(4):
        clock.now += 20
        await store.renew([ticket], [replace(lease, ms=60_000)])
    assert (await store.reserve(*subject, "other", 1)).code == "too_many_streams"
    assert await redis.pttl(lease.key) > 5_000  # the chat's lease is pushed back with the slot


async def test_a_stale_lease_is_released_only_while_it_is_still_the_same(
    store_for: StoreFor, subject: tuple[str, str], redis: Redis
) -> None:
    store = store_for(Clock(datetime(2026, 5, 1, 10, 0, 0, tzinfo=UTC)))
    key = store.lease_key(subject[0], "chat")
    await redis.set(key, "instance-b message-2", px=60_000)  # taken by another stream since
    await store.release(Lease(key, "instance-a message-1", 60_000))
    assert await redis.get(key) == b"instance-b message-2"
    await store.release(Lease(key, "instance-b message-2", 60_000))
    assert await redis.exists(key) == 0


async def test_refusal_comes_before_any_sse_byte_with_headers(
    start_gateway: Any, db: Pool
) -> None:
    headers = auth_headers(f"u-{uuid.uuid4().hex[:6]}", f"org-{uuid.uuid4().hex[:6]}")
    async with start_gateway(quota_user_tokens=300, quota_requests_per_minute=10,
                             quota_default_max_tokens=100) as gateway, \
            httpx.AsyncClient(base_url=gateway.url) as http:
        chat_id = await new_chat(http, headers)
        ok = await http.post(f"/v1/chats/{chat_id}/messages", headers=headers, json={"content": "hello"})
        assert ok.status_code == 200
        assert ok.headers["x-ratelimit-limit-tokens"] == "300"
        assert int(ok.headers["x-ratelimit-remaining-tokens"]) == 300 - (2 + 100)
        assert ok.headers["x-ratelimit-limit-requests"] == "10"
        assert ok.headers["x-ratelimit-remaining-requests"] == "9"
        big = await http.post(f"/v1/chats/{chat_id}/messages", headers=headers,
                              json={"content": "hello", "max_tokens": 1000})
        assert big.status_code == 429
        assert big.headers["content-type"] == "application/json"
        assert big.json()["error"]["code"] == "quota_exceeded"
        assert abs(int(big.headers["retry-after"]) - seconds_to_utc_midnight()) <= 2
        assert "x-ratelimit-remaining-tokens" in big.headers
        usage = (await http.get("/v1/usage", headers=headers)).json()
    assert usage["user_tokens"]["limit"] == 300
    assert usage["user_tokens"]["used"] == 1 + 1  # the fake reports "hello" as 1 token in and 1 out
    assert usage["requests_per_minute"] == {"limit": 10, "used": 1, "remaining": 9}
    assert usage["concurrent_streams"] == {"limit": None, "active": 0}


def budgets(usage: httpx.Response) -> dict[str, Any]:
    """The caller's usage without the seconds left to each reset, which count down as the clock runs."""
    body: dict[str, Any] = usage.json()
    for value in body.values():
        if isinstance(value, dict):
            value.pop("resets_in_s", None)
    return body


def seconds_to_utc_midnight() -> int:
    now = datetime.now(UTC)
    return 86400 - (now.hour * 3600 + now.minute * 60 + now.second)


async def test_a_chats_history_counts_in_the_admission_of_its_turns(start_gateway: Any) -> None:
    headers = auth_headers(f"u-{uuid.uuid4().hex[:6]}", f"org-{uuid.uuid4().hex[:6]}")
    long = "a" * 1600  # 400 tokens by the estimate
    async with start_gateway(quota_user_tokens=2000, quota_default_max_tokens=10) as gateway, \
            httpx.AsyncClient(base_url=gateway.url) as http:
        chat_id = await new_chat(http, headers)
        assert (await http.post(f"/v1/chats/{chat_id}/messages", headers=headers,
                                json={"content": long})).status_code == 200
        used = (await http.get("/v1/usage", headers=headers)).json()["user_tokens"]["used"]
        # The history is the message and its echo: 3,200 characters. With "more", 801 tokens and 10 to answer.
        async with http.stream("POST", f"/v1/chats/{chat_id}/messages", headers=headers,
                               json={"content": "more", "model": "fake/echo?tokens=100&gap_ms=20"}) as response:
            assert response.status_code == 200
            assert int(response.headers["x-ratelimit-remaining-tokens"]) == 2000 - used - 811
            events = read_events(response)
            await next_delta(events)
            usage = (await http.get("/v1/usage", headers=headers)).json()
            turn = gateway.services.streams.turns[uuid.UUID(chat_id)]
        assert usage["user_tokens"]["reserved"] == usage["org_tokens"]["reserved"] == 811
        await turn.finished()
        after = (await http.get("/v1/usage", headers=headers)).json()
    assert after["user_tokens"]["reserved"] == after["org_tokens"]["reserved"] == 0


async def test_a_turn_whose_history_overdraws_the_budget_is_refused_and_changes_nothing(
    start_gateway: Any, db: Pool
) -> None:
    org = f"org-{uuid.uuid4().hex[:6]}"
    headers = auth_headers(f"u-{uuid.uuid4().hex[:6]}", org)
    async with start_gateway(quota_default_max_tokens=10) as gateway, \
            httpx.AsyncClient(base_url=gateway.url) as http:
        await put_override(db, org, "org", org, QuotaOverride(tokens_per_period=500))  # the org's is tighter
        chat_id = await new_chat(http, headers)
        assert (await http.post(f"/v1/chats/{chat_id}/messages", headers=headers,
                                json={"content": "a" * 1600})).status_code == 200
        before = budgets(await http.get("/v1/usage", headers=headers))
        # "more" alone (11 tokens) fits in what is left; with its history (811) it does not.
        refused = await http.post(f"/v1/chats/{chat_id}/messages", headers=headers, json={"content": "more"})
        after = budgets(await http.get("/v1/usage", headers=headers))
        listed = (await http.get(f"/v1/chats/{chat_id}/messages", headers=headers)).json()
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "quota_exceeded"
    assert abs(int(refused.headers["retry-after"]) - seconds_to_utc_midnight()) <= 2
    assert after == before
    assert after["requests_per_minute"]["used"] == 1 and after["org_tokens"]["reserved"] == 0
    assert [m["content"] for m in listed["items"]] == ["a" * 1600, "a" * 1600]


async def test_a_turn_refused_after_its_early_write_is_taken_back_and_changes_nothing(
    start_gateway: Any, db: Pool
) -> None:
    """A turn that names its model is written once admitted, while its chat is read, when no history could
    exhaust the budget's headroom, attachments' notes apart. Here notes do: the turn is refused after its
    write, which is taken back."""
    headers = auth_headers(f"u-{uuid.uuid4().hex[:6]}", f"org-{uuid.uuid4().hex[:6]}")
    # A history of at most 100 characters and the longest system prompt: 5,025 tokens at most, apart from
    # notes; "more" asks 11 of a budget of 6,000.
    async with start_gateway(history_chars=100, quota_user_tokens=6000, quota_default_max_tokens=10) as gateway, \
            httpx.AsyncClient(base_url=gateway.url) as http:
        chat_id = await new_chat(http, headers)
        chat = await db.fetchrow("SELECT org_id, user_id FROM chats WHERE id = $1", uuid.UUID(chat_id))
        # Two messages stored before attachments were checked, each naming 16 no model is shown: 8,400 tokens.
        parts = [{"type": "text", "text": "old"}] + [
            {"type": "attachment", "name": "n" * 1000, "media_type": "text/plain", "url": "https://x/n.txt"}] * 16
        for _ in range(2):
            await db.execute("INSERT INTO messages (id, chat_id, org_id, user_id, role, content, parts)"
                             " VALUES ($1, $2, $3, $4, 'user', 'old', $5)",
                             uuid.uuid4(), uuid.UUID(chat_id), chat["org_id"], chat["user_id"], parts)
        before, usage = await chat_rows(db, chat_id), budgets(await http.get("/v1/usage", headers=headers))
        writes = sample((await http.get("/metrics")).text, INSERT_TURNS)
        refused = await http.post(f"/v1/chats/{chat_id}/messages", headers=headers,
                                  json={"content": "more", "model": "fake/echo"})
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "quota_exceeded"
        assert sample((await http.get("/metrics")).text, INSERT_TURNS) == writes + 1  # written, then taken back
        assert await chat_rows(db, chat_id) == before
        assert budgets(await http.get("/v1/usage", headers=headers)) == usage


async def test_a_turn_that_does_not_start_leaves_the_quota_as_it_was(start_gateway: Any) -> None:
    headers = auth_headers(f"u-{uuid.uuid4().hex[:6]}", f"org-{uuid.uuid4().hex[:6]}")
    async with start_gateway(quota_user_tokens=1000, quota_default_max_tokens=10, quota_requests_per_minute=1,
                             quota_max_concurrent_streams=1) as gateway, \
            httpx.AsyncClient(base_url=gateway.url) as http:
        missing = await http.post(f"/v1/chats/{uuid.uuid4()}/messages", headers=headers, json={"content": "hi"})
        chat_id = await new_chat(http, headers, model="nowhere/model")  # admitted, then refused for its model
        unknown = await http.post(f"/v1/chats/{chat_id}/messages", headers=headers, json={"content": "hi"})
        untouched = (await http.get("/v1/usage", headers=headers)).json()
        # Its one request a minute, its one stream and the chat's lease are all still free.
        ok = await http.post(f"/v1/chats/{chat_id}/messages", headers=headers,
                             json={"content": "hi", "model": "fake/echo"})
        # Out of requests now, yet a missing chat and an unknown model are still what the client hears.
        missing_again = await http.post(f"/v1/chats/{uuid.uuid4()}/messages", headers=headers, json={"content": "hi"})
        bad_model = await http.post(f"/v1/chats/{chat_id}/messages", headers=headers,
                                    json={"content": "hi", "model": "nowhere/else"})
        limited = await http.post(f"/v1/chats/{chat_id}/messages", headers=headers,
                                  json={"content": "hi", "model": "fake/echo"})
    assert missing.status_code == missing_again.status_code == 404
    assert unknown.status_code == bad_model.status_code == 404
    assert unknown.json()["error"]["code"] == bad_model.json()["error"]["code"] == "model_not_found"
    assert untouched["requests_per_minute"]["used"] == 0
    assert untouched["user_tokens"]["reserved"] == untouched["user_tokens"]["used"] == 0
    assert untouched["concurrent_streams"]["active"] == 0
    assert ok.status_code == 200
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"


async def test_a_refused_turn_leaves_its_chat_as_it_was(start_gateway: Any, db: Pool) -> None:
    # A turn refused by its quota, by the stream already running in its chat, or by its chat's own model
    # (known only once the chat is read) writes nothing: untitled chats stay untitled, and no message,
    # activity time or title is left behind.
    headers = auth_headers(f"u-{uuid.uuid4().hex[:6]}", f"org-{uuid.uuid4().hex[:6]}")
    async with start_gateway(quota_user_tokens=1000, quota_default_max_tokens=10) as gateway, \
            httpx.AsyncClient(base_url=gateway.url) as http:
        unknown = await new_chat(http, headers, model="nowhere/model")
        busy = await new_chat(http, headers, model="fake/echo?tokens=2&gap_ms=60000")
        async with http.stream("POST", f"/v1/chats/{busy}/messages", headers=headers,
                               json={"content": "first"}) as running:
            stream = read_events(running)  # one iterator throughout: abandoning one closes the connection
            await next_delta(stream)
            before = await chat_rows(db, unknown, busy)
            refused = [await http.post(f"/v1/chats/{chat}/messages", headers=headers, json=body) for chat, body in (
                (unknown, {"content": "hi"}),
                (busy, {"content": "second"}),
                (unknown, {"content": "hi", "model": "fake/echo", "max_tokens": 2000}),
            )]
            after = await chat_rows(db, unknown, busy)
    assert [(r.status_code, r.json()["error"]["code"]) for r in refused] == [
        (404, "model_not_found"), (409, "stream_already_active"), (429, "quota_exceeded")]
    assert after == before
    assert [row["title"] for row in before if "role" not in row] == [None, "first"]


async def chat_rows(db: Pool, *chat_ids: str) -> list[dict[str, Any]]:
    """The chats as rows, then their messages (without the content a running reply adds to)."""
    ids = [uuid.UUID(chat_id) for chat_id in chat_ids]
    chats = await db.fetch("SELECT * FROM chats WHERE id = ANY($1) ORDER BY array_position($1, id)", ids)
    replies = await db.fetch("SELECT id, chat_id, role, status, model, created_at FROM messages"
                             " WHERE chat_id = ANY($1) ORDER BY seq", ids)
    return [dict(row) for row in chats] + [dict(row) for row in replies]


async def test_settlement_charges_what_was_produced(
    client: httpx.AsyncClient, gateway: Any, db: Pool, redis: Redis
) -> None:
    org, user = f"org-{uuid.uuid4().hex[:6]}", f"u-{uuid.uuid4().hex[:6]}"
    headers = auth_headers(user, org)
    aborted = await new_chat(client, headers, model="fake/echo?tokens=400&gap_ms=10")
    async with client.stream("POST", f"/v1/chats/{aborted}/messages", headers=headers,
                             json={"content": "abort me", "max_tokens": 500}) as response:
        events = read_events(response)
        await next_delta(events)
        turn = gateway.services.streams.turns[uuid.UUID(aborted)]
    await turn.finished()
    failed = await new_chat(client, headers, model="fake/echo?fail_after=0")
    assert (await client.post(f"/v1/chats/{failed}/messages", headers=headers,
                              json={"content": "fail"})).status_code == 502
    complete = await new_chat(client, headers)
    await client.post(f"/v1/chats/{complete}/messages", headers=headers, json={"content": "all of it"})

    rows = await db.fetch("SELECT chat_id, input_tokens, output_tokens, charged_tokens, estimated "
                          "FROM usage_ledger WHERE org_id = $1 AND user_id = $2", org, user)
    by_chat = {str(row["chat_id"]): row for row in rows}
    row = await db.fetchrow("SELECT content FROM messages WHERE id = $1", turn.ids.assistant_message_id)
    produced = math.ceil(len(row["content"]) / 4)
    assert by_chat[aborted]["charged_tokens"] == 2 + produced < 500
    assert by_chat[aborted]["estimated"]
    assert by_chat[failed]["charged_tokens"] == 0
    assert by_chat[complete]["charged_tokens"] == 2 + 3 and not by_chat[complete]["estimated"]
    usage = (await client.get("/v1/usage", headers=headers)).json()
    assert usage["user_tokens"]["used"] == sum(r["charged_tokens"] for r in rows)
    assert usage["org_tokens"]["used"] == sum(r["charged_tokens"] for r in rows)
    assert usage["user_tokens"]["reserved"] == 0


@contextlib.asynccontextmanager
async def shared_fake_gateways(start_gateway: Any, count: int, **overrides: Any) -> AsyncIterator[
        tuple[FakeProvider, list[str]]]:
    """Gateway instances that share one fake provider, so it sees every stream of every instance."""
    fake = FakeProvider()
    async with contextlib.AsyncExitStack() as stack:
        urls = [(await stack.enter_async_context(start_gateway(ProviderRegistry([fake]), **overrides))).url
                for _ in range(count)]
        yield fake, urls


async def test_concurrency_cap_holds_across_instances(start_gateway: Any) -> None:
    cap = 3
    headers = auth_headers(f"u-{uuid.uuid4().hex[:6]}", f"org-{uuid.uuid4().hex[:6]}")
    async with shared_fake_gateways(start_gateway, 2, quota_max_concurrent_streams=cap) as (fake, urls):
        clients = [httpx.AsyncClient(base_url=url, timeout=30) for url in urls]
        chats = [await new_chat(clients[0], headers, model="fake/echo?tokens=30&gap_ms=10") for _ in range(5 * cap)]

        async def send(n: int) -> int:
            response = await clients[n % 2].post(f"/v1/chats/{chats[n]}/messages", headers=headers,
                                                 json={"content": "busy"})
            if response.status_code == 429:
                assert response.json()["error"]["code"] == "too_many_streams"
                assert int(response.headers["retry-after"]) >= 1
            return response.status_code

        statuses = await asyncio.gather(*(send(n) for n in range(5 * cap)))
        for client in clients:
            await client.aclose()
    assert statuses.count(200) >= cap and set(statuses) <= {200, 429}
    assert fake.max_running == cap


async def test_budget_admits_exactly_n_across_two_processes(
    settings: Settings, db: Pool, redis: Redis
) -> None:
    admitted_target, max_tokens = 5, 100
    org, user = f"org-{uuid.uuid4().hex[:6]}", f"u-{uuid.uuid4().hex[:6]}"
    headers = auth_headers(user, org)
    estimate = 1 + max_tokens  # "race" is one token of prompt by the estimate
    await put_override(db, org, "user", user, QuotaOverride(tokens_per_period=admitted_target * estimate))
    assert settings.database_url and settings.redis_url
    env = {"GATEWAY_DATABASE_URL": settings.database_url, "GATEWAY_REDIS_URL": settings.redis_url,
           "GATEWAY_REDIS_PREFIX": settings.redis_prefix, "GATEWAY_JWT_SECRET": JWT_SECRET}
    async with gateway_process(env) as a, gateway_process(env) as b:
        clients = [httpx.AsyncClient(base_url=a.url, timeout=30), httpx.AsyncClient(base_url=b.url, timeout=30)]
        chats = [await new_chat(clients[0], headers, model="fake/echo?tokens=200&gap_ms=25")
                 for _ in range(10 * admitted_target)]

        total, decided, all_decided = 10 * admitted_target, [], asyncio.Event()

        async def send(n: int) -> tuple[int, str]:
            async with clients[n % 2].stream("POST", f"/v1/chats/{chats[n]}/messages", headers=headers,
                                             json={"content": "race", "max_tokens": max_tokens}) as response:
                decided.append(n)
                if len(decided) == total:
                    all_decided.set()
                if response.status_code != 200:
                    return response.status_code, (await response.aread()).decode()
                # Admitted streams hold their reservation until every request is decided, then hang up.
                events = read_events(response)
                await next_delta(events)
                await all_decided.wait()
                return 200, ""

        results = await asyncio.gather(*(send(n) for n in range(total)))
        for client in clients:
            await client.aclose()
    statuses = [status for status, _ in results]
    assert statuses.count(200) == admitted_target
    assert statuses.count(429) == 9 * admitted_target
    assert all('"quota_exceeded"' in body for status, body in results if status == 429)
    charged = await db.fetchval("SELECT sum(charged_tokens) FROM usage_ledger WHERE org_id = $1 AND user_id = $2",
                                org, user)
    assert 0 < charged <= admitted_target * estimate


@pytest.mark.parametrize("mode", ["closed", "open"])
async def test_redis_down_follows_the_fail_mode(start_gateway: Any, tmp_path: Path, mode: str) -> None:
    headers = auth_headers(f"u-{uuid.uuid4().hex[:6]}", f"org-{uuid.uuid4().hex[:6]}")
    with embedded_redis(tmp_path / "redis") as url:
        gateway_cm = start_gateway(redis_url=url, quota_fail_mode=mode, quota_user_tokens=10_000)
        gateway = await gateway_cm.__aenter__()
    try:  # the embedded Redis has stopped: every Redis call of this gateway now fails
        async with httpx.AsyncClient(base_url=gateway.url) as http:
            chat_id = await new_chat(http, headers)
            response = await http.post(f"/v1/chats/{chat_id}/messages", headers={**headers, "Accept": "application/json"},
                                       json={"content": "still there?"})
    finally:
        await gateway_cm.__aexit__(None, None, None)
    if mode == "closed":
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "unavailable"
    else:
        assert response.status_code == 200
        assert response.json()["assistant_message"]["content"] == "still there?"


async def test_admin_sets_limits_for_users_of_its_org(client: httpx.AsyncClient) -> None:
    org = f"org-{uuid.uuid4().hex[:6]}"
    admin, member = auth_headers("boss", org, role="admin"), auth_headers("worker", org)
    path = "/v1/admin/quotas/user/worker"
    assert (await client.get(path, headers=member)).status_code == 403
    assert (await client.get("/v1/admin/quotas/org/another-org", headers=admin)).status_code == 403
    assert (await client.get("/v1/admin/quotas/team/x", headers=admin)).status_code == 422
    for bad in ({"tokens_per_period": -1}, {"period": "week"}, {"requests_per_minute": "lots"}, {"colour": 1}):
        response = await client.put(path, headers=admin, json=bad)
        assert response.status_code == 422, bad
    assert (await client.get(path, headers=admin)).json()["overridden"] is False
    put = await client.put(path, headers=admin, json={"tokens_per_period": 0, "requests_per_minute": 5})
    assert put.status_code == 200
    assert put.json()["tokens_per_period"] == 0 and put.json()["overridden"] is True
    assert (await client.get(path, headers=admin)).json()["requests_per_minute"] == 5
    chat_id = await new_chat(client, member)
    refused = await client.post(f"/v1/chats/{chat_id}/messages", headers=member, json={"content": "hi"})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "quota_exceeded"
    org_put = await client.put(f"/v1/admin/quotas/org/{org}", headers=admin, json={"tokens_per_period": 10**6})
    assert org_put.status_code == 200


@pytest.mark.parametrize("estimate", [10**16, -1, 1.5])
async def test_the_admission_script_refuses_a_bad_count_before_writing(
    store_for: StoreFor, subject: tuple[str, str], estimate: Any
) -> None:
    """In Redis: the scripts check their numbers before any write."""
    org_id, user_id = subject
    store = store_for(Clock(datetime.now(UTC)), user_tokens=1000)
    with pytest.raises(ResponseError):
        await store.reserve(org_id, user_id, "s1", estimate)
    report = await store.usage(org_id, user_id)
    assert report["user_tokens"]["reserved"] == 0 and report["concurrent_streams"]["active"] == 0


async def test_a_script_error_is_never_taken_for_an_outage(
    store_for: StoreFor, subject: tuple[str, str]
) -> None:
    """with ``GATEWAY_QUOTA_FAIL_MODE=open`` a script error was taken for an outage and the check
    skipped. It is a 500: the stream never goes ahead unchecked."""
    org_id, user_id = subject
    guard = QuotaGuard(store_for(Clock(datetime.now(UTC)), user_tokens=1000), "open", 1024)
    with pytest.raises(GatewayError) as refused:
        await guard.admit(org_id, user_id, "s1", 10**16)
    assert refused.value.status == 500


async def test_an_org_at_its_request_rate_refuses_its_users_but_not_another_orgs(start_gateway: Any) -> None:
    org = f"org-{uuid.uuid4().hex[:6]}"
    alice, bob = auth_headers(f"alice-{uuid.uuid4().hex[:6]}", org), auth_headers(f"bob-{uuid.uuid4().hex[:6]}", org)
    carol = auth_headers(f"carol-{uuid.uuid4().hex[:6]}", f"org-{uuid.uuid4().hex[:6]}")
    admin = auth_headers("boss", org, role="admin")
    async with start_gateway(quota_org_requests_per_minute=2, quota_requests_per_minute=5) as gateway, \
            httpx.AsyncClient(base_url=gateway.url) as http:
        chats = [await new_chat(http, headers) for headers in (alice, bob, carol)]

        async def send(headers: dict[str, str], chat_id: str) -> httpx.Response:
            return await http.post(f"/v1/chats/{chat_id}/messages", headers=headers, json={"content": "hi"})

        admitted = [await send(alice, chats[0]), await send(bob, chats[1])]
        refused = [await send(alice, chats[0]), await send(bob, chats[1])]
        other_org = await send(carol, chats[2])
        usage = (await http.get("/v1/usage", headers=alice)).json()
        quota = (await http.get(f"/v1/admin/quotas/org/{org}", headers=admin)).json()
    assert [r.status_code for r in admitted] == [200, 200]
    # The org's 2 a minute are tighter than each user's 5: the request headers describe the org's.
    assert [(r.headers["x-ratelimit-limit-requests"], r.headers["x-ratelimit-remaining-requests"])
            for r in admitted] == [("2", "1"), ("2", "0")]
    for response in refused:
        assert response.status_code == 429 and response.json()["error"]["code"] == "rate_limited"
        assert 0 < int(response.headers["retry-after"]) <= 60
        assert response.headers["x-ratelimit-remaining-requests"] == "0"
    assert other_org.status_code == 200 and other_org.headers["x-ratelimit-remaining-requests"] == "1"
    assert usage["org_requests_per_minute"] == {"limit": 2, "used": 2, "remaining": 0}
    assert usage["requests_per_minute"] == {"limit": 5, "used": 1, "remaining": 4}
    assert quota["requests_per_minute"] is None and quota["defaults"]["requests_per_minute"] == 2


async def test_an_orgs_own_request_rate_slides_over_all_its_users(
    store_for: StoreFor, db: Pool, subject: tuple[str, str]
) -> None:
    org, user = subject
    await put_override(db, org, "org", org, QuotaOverride(requests_per_minute=3))  # over the default of 100
    clock = Clock(datetime(2026, 5, 1, 10, 0, 0, tzinfo=UTC))
    store = store_for(clock, requests_per_minute=5, org_requests_per_minute=100)
    decisions = []
    for n, who in enumerate((user, "second", "second")):
        decisions.append(await store.reserve(org, who, f"r{n}", 1))
        clock.now += 10
    assert [(d.code, d.request_limit, d.requests_remaining) for d in decisions] == [
        ("ok", 3, 2), ("ok", 3, 1), ("ok", 3, 0)]
    refused = await store.reserve(org, user, "r3", 1)  # the user has made 1 of its 5
    assert (refused.code, refused.retry_after_s, refused.requests_remaining) == ("rate_limited", 30, 0)
    assert (await store.reserve("another-org", user, "r4", 1)).admitted
    clock.now += 30  # the first request leaves the window
    back = await store.reserve(org, user, "r5", 1)
    assert back.admitted and back.ticket is not None
    await store.settle(back.ticket, 0, withdrawn=True)  # leaves both windows: one more fits
    assert (await store.usage(org, user))["org_requests_per_minute"] == {"limit": 3, "used": 2, "remaining": 1}
    assert (await store.reserve(org, user, "r6", 1)).admitted


async def test_over_both_request_rates_the_wait_is_until_both_allow_one_more(
    store_for: StoreFor, subject: tuple[str, str]
) -> None:
    org, user = subject
    clock = Clock(datetime(2026, 5, 1, 10, 0, 0, tzinfo=UTC))
    store = store_for(clock, requests_per_minute=1, org_requests_per_minute=2)
    assert (await store.reserve(org, "first", "a", 1)).admitted
    clock.now += 30
    assert (await store.reserve(org, user, "b", 1)).admitted
    clock.now += 10
    both = await store.reserve(org, user, "c", 1)  # its own window frees in 50 s, the org's in 20 s
    org_only = await store.reserve(org, "fresh", "d", 1)
    assert (both.code, both.retry_after_s) == ("rate_limited", 50)
    assert (org_only.code, org_only.retry_after_s) == ("rate_limited", 20)


async def test_a_lowered_org_rate_waits_until_enough_requests_have_left_its_window(
    store_for: StoreFor, db: Pool, subject: tuple[str, str]
) -> None:
    org, user = subject
    start = datetime(2026, 5, 1, 10, 0, 0, tzinfo=UTC).timestamp()
    clock = Clock(datetime.fromtimestamp(start, UTC))
    store = store_for(clock, org_requests_per_minute=5)
    for n in range(4):
        clock.now = start + 10 * n
        assert (await store.reserve(org, f"{user}-{n % 2}", f"r{n}", 1)).admitted
    await put_override(db, org, "org", org, QuotaOverride(requests_per_minute=2))
    await store.forget_limits(org, "org", org)
    clock.now = start + 35
    refused = await store.reserve(org, user, "r4", 1)
    # 4 in the window at 0, 10, 20 and 30 s, now 35 s: one more fits once 3 have left, at 80 s.
    assert (refused.code, refused.retry_after_s, refused.request_limit) == ("rate_limited", 45, 2)


async def test_a_turn_that_does_not_start_leaves_no_request_in_its_orgs_window(start_gateway: Any) -> None:
    headers = auth_headers(f"u-{uuid.uuid4().hex[:6]}", f"org-{uuid.uuid4().hex[:6]}")
    async with start_gateway(quota_org_requests_per_minute=1) as gateway, \
            httpx.AsyncClient(base_url=gateway.url) as http:
        missing = await http.post(f"/v1/chats/{uuid.uuid4()}/messages", headers=headers, json={"content": "hi"})
        chat_id = await new_chat(http, headers)
        ok = await http.post(f"/v1/chats/{chat_id}/messages", headers=headers, json={"content": "hi"})
        limited = await http.post(f"/v1/chats/{chat_id}/messages", headers=headers, json={"content": "hi"})
    assert missing.status_code == 404 and ok.status_code == 200
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"


async def test_an_admin_sets_its_orgs_request_rate(client: httpx.AsyncClient) -> None:
    org = f"org-{uuid.uuid4().hex[:6]}"
    admin, member = auth_headers("boss", org, role="admin"), auth_headers("worker", org)
    put = await client.put(f"/v1/admin/quotas/org/{org}", headers=admin, json={"requests_per_minute": 1})
    assert put.status_code == 200 and put.json()["requests_per_minute"] == 1
    chats = [await new_chat(client, headers) for headers in (admin, member)]
    first = await client.post(f"/v1/chats/{chats[0]}/messages", headers=admin, json={"content": "hi"})
    second = await client.post(f"/v1/chats/{chats[1]}/messages", headers=member, json={"content": "hi"})
    assert first.status_code == 200
    assert second.status_code == 429 and second.json()["error"]["code"] == "rate_limited"
    assert "retry-after" in second.headers
