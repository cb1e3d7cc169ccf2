"""Faults at each vendor's wire, at the first byte and mid-stream: whatever ends a turn ends its reply row,
releases its stream slot and settles its token reservation."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import httpx_sse
import orjson
import pytest

from providers.base import ProviderRequest, ProviderStream, Pump, StreamBatch
from providers.fake import FakeProvider
from providers.registry import ProviderRegistry
from storage.db import Pool
from tests.api.test_send import new_chat, read_events
from tests.conftest import Gateway, auth_headers
from tests.providers.test_adapters import adapter_for
from tests.vendors import TOKENS, VENDORS, ScriptedProvider

# Each fault's scenario at the first byte and after two tokens (see tests/vendors.py).
FAULTS = {
    "drop": {"first": "drop-first", "mid": "drop"},
    "garbage": {"first": "garbage-first", "mid": "garbage-mid"},
    "wrong-shape": {"first": "shape-first", "mid": "shape-mid"},
    "non-sse": {"first": "html", "mid": "html-mid"},
    "stall": {"first": "stall-first", "mid": "stall"},
}
CASES = [(vendor, fault, position) for vendor in VENDORS for fault in FAULTS for position in ("first", "mid")]
TIMEOUT_S = 0.5  # the first-token and idle timeouts, so a stall ends quickly
SETTLE_S = 1.0  # how long after its response ends a turn may take to free what it held
RESPONSE_S = 10.0  # a response that has not ended by then never will
FINAL_REASONS = {"stop", "length", "cancelled", "client_disconnected", "error", "content_filter", "tool_calls",
                 "interrupted"}


@dataclass
class Answer:
    """What the client got: the status and either the SSE events or the JSON body; ``broken`` says how a
    response that did not end properly ended instead."""

    status: int
    events: list[httpx_sse.ServerSentEvent] = field(default_factory=list)
    body: Any = None
    broken: str | None = None

    @property
    def streamed(self) -> bool:
        return bool(self.events)

    @property
    def text(self) -> str:
        return "".join(event.json()["text"] for event in self.events if event.event == "delta")

    def __str__(self) -> str:
        ending = f", then {self.broken}" if self.broken else ""
        if self.streamed:
            last = self.events[-1]
            return f"HTTP {self.status}, SSE {[e.event for e in self.events]}, last {last.event} {last.data}{ending}"
        return f"HTTP {self.status}, body {self.body!r}{ending}"


@dataclass
class Held:
    """What the turn still held when it settled, or when the time to settle ran out."""

    user_reserved: int
    org_reserved: int
    active_streams: int
    replies: list[asyncpg.Record]

    @property
    def nothing(self) -> bool:
        return (self.user_reserved, self.org_reserved, self.active_streams) == (0, 0, 0)

    @property
    def final(self) -> bool:
        return all(row["status"] != "streaming" for row in self.replies)

    def __str__(self) -> str:
        rows = [(row["status"], row["finish_reason"], row["content"]) for row in self.replies]
        return (f"reserved user {self.user_reserved} org {self.org_reserved}, active streams "
                f"{self.active_streams}; replies (status, finish_reason, content) {rows}")


class RaisingProvider(ScriptedProvider):
    """An adapter with a bug: a plain exception (no ProviderError) where its model name says, while it
    builds the request (``raising/build``), at its first read (``raising/first``) or after two tokens
    (``raising/mid``)."""

    name = "raising"
    models: tuple[str, ...] = ("build", "first", "mid")

    def stream(self, request: ProviderRequest) -> ProviderStream:
        if request.model == "build":
            raise RuntimeError("a bug while building the request")
        return Pump(self._batches(request.model))

    async def _batches(self, where: str) -> AsyncIterator[StreamBatch]:
        if where == "mid":
            yield [TOKENS[0]]
            yield [TOKENS[1]]
        raise RuntimeError("a bug while reading the answer")


@pytest.fixture(scope="module")
async def fault_gateway(start_gateway: Any, vendors: dict[str, Any], db: Pool) -> AsyncIterator[Gateway]:
    registry = ProviderRegistry(
        [FakeProvider(), RaisingProvider(), *(adapter_for(v, vendors[v][1], idle_timeout_s=TIMEOUT_S) for v in VENDORS)])
    async with start_gateway(registry, retries=0, first_token_timeout_s=TIMEOUT_S, idle_timeout_s=TIMEOUT_S,
                             quota_user_tokens=100_000, quota_org_tokens=1_000_000,
                             quota_max_concurrent_streams=2) as gateway:
        yield gateway


@pytest.fixture
async def http(fault_gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fault_gateway.url, timeout=RESPONSE_S) as client:
        yield client


async def send_turn(http: httpx.AsyncClient, headers: dict[str, str], chat_id: str, model: str) -> Answer:
    """``POST /v1/chat``, read to its end: a JSON refusal or failure, or a stream (kept as far as it came
    when the connection breaks or the response does not end)."""
    answer = Answer(0)
    try:
        async with asyncio.timeout(RESPONSE_S), http.stream(
                "POST", "/v1/chat", headers=headers, json={"chat_id": chat_id, "message": "hi", "model": model}
        ) as response:
            answer.status = response.status_code
            if response.headers.get("content-type", "").startswith("text/event-stream"):
                async for event in read_events(response):
                    answer.events.append(event)
                return answer
            answer.body = await response.aread()
            answer.body = orjson.loads(answer.body)
    except orjson.JSONDecodeError:
        pass  # not JSON: shown as it came
    except httpx.TransportError as error:
        answer.broken = f"the connection broke ({error!r})"
    except TimeoutError:
        answer.broken = f"no end after {RESPONSE_S} s"
    return answer


async def held_after(http: httpx.AsyncClient, headers: dict[str, str], db: Pool, chat_id: str) -> Held:
    """What the turn holds once it holds nothing and its reply is final, or after ``SETTLE_S``."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        usage = (await http.get("/v1/usage", headers=headers)).json()
        replies = await db.fetch("SELECT * FROM messages WHERE chat_id = $1 AND role = 'assistant'",
                                 uuid.UUID(chat_id))
        held = Held(usage["user_tokens"]["reserved"], usage["org_tokens"]["reserved"],
                    usage["concurrent_streams"]["active"], replies)
        if (held.nothing and held.final) or time.monotonic() >= deadline:
            return held
        await asyncio.sleep(0.02)  # polling state only the gateway changes, as ``eventually`` does


@pytest.mark.parametrize(("vendor", "fault", "position"), CASES, ids=["-".join(case) for case in CASES])
async def test_a_vendor_fault_ends_the_reply_and_frees_its_reservation_and_slot(
    http: httpx.AsyncClient, db: Pool, vendor: str, fault: str, position: str
) -> None:
    headers = auth_headers(f"u-{uuid.uuid4().hex[:8]}", f"org-{uuid.uuid4().hex[:8]}")
    chat_id = await new_chat(http, headers)
    answer = await send_turn(http, headers, chat_id, f"{vendor}/{FAULTS[fault][position]}")
    held = await held_after(http, headers, db, chat_id)

    assert held.nothing, f"{answer}; {SETTLE_S} s later still {held}"
    assert answer.broken is None, f"{answer}; {held}"
    assert len(held.replies) == 1 and held.final, f"{answer}; {SETTLE_S} s later {held}"
    reply = held.replies[0]
    assert (reply["status"], reply["finish_reason"]) == ("error", "error"), f"{answer}; {held}"
    if answer.streamed:
        assert answer.status == 200 and answer.events[-1].event == "error", f"{answer}; {held}"
        assert reply["content"].startswith(answer.text), f"{answer}; {held}"
    else:
        assert answer.status >= 500 and isinstance(answer.body, dict) and "error" in answer.body, f"{answer}; {held}"
    if position == "mid":  # the fault came after the first tokens reached the client
        assert answer.text == "".join(TOKENS[:2]), f"{answer}; {held}"


@pytest.mark.parametrize("model", ["fake/echo?fail_after=0&fail=abc", "gemini/\u20ac"], ids=["fail-abc", "gemini-euro"])
async def test_a_turn_that_fails_with_any_error_frees_its_reservation_and_slot(
    http: httpx.AsyncClient, db: Pool, model: str
) -> None:
    # An exception other than a ProviderError (the fake's option "abc" read as
    # a status; a non-ASCII model id in Gemini's URL) left the turn's tokens reserved, its stream slot taken
    # and its reply "streaming", for good. A refusal up front, before admission, is fine too.
    headers = auth_headers(f"u-{uuid.uuid4().hex[:8]}", f"org-{uuid.uuid4().hex[:8]}")
    chat_id = await new_chat(http, headers)
    answer = await send_turn(http, headers, chat_id, model)
    held = await held_after(http, headers, db, chat_id)

    assert held.nothing, f"{answer}; {SETTLE_S} s later still {held}"
    assert answer.broken is None, f"{answer}; {held}"
    if not held.replies:  # no reply begun: only a refusal of the request, before admission, begins none
        assert answer.status == 422, f"{answer}; {held}"
        return
    assert len(held.replies) == 1 and held.final, f"{answer}; {SETTLE_S} s later {held}"
    assert held.replies[0]["finish_reason"] in FINAL_REASONS, f"{answer}; {held}"
    if answer.streamed:
        assert held.replies[0]["content"].startswith(answer.text), f"{answer}; {held}"


@pytest.mark.parametrize("accept", ["text/event-stream", "application/json"], ids=["stream", "json"])
@pytest.mark.parametrize("where", RaisingProvider.models)
async def test_an_adapter_that_raises_anything_still_ends_its_turn(
    http: httpx.AsyncClient, db: Pool, where: str, accept: str
) -> None:
    # Any exception out of an adapter ends the turn the one way a
    # provider error does (reply final, slot and reservation freed), streamed or answered as JSON.
    headers = auth_headers(f"u-{uuid.uuid4().hex[:8]}", f"org-{uuid.uuid4().hex[:8]}")
    chat_id = await new_chat(http, headers)
    response = await http.post("/v1/chat", headers={**headers, "Accept": accept},
                               json={"chat_id": chat_id, "message": "hi", "model": f"raising/{where}"})
    held = await held_after(http, headers, db, chat_id)

    assert held.nothing and held.final and len(held.replies) == 1, f"HTTP {response.status_code}; {held}"
    reply = held.replies[0]
    assert (reply["status"], reply["finish_reason"]) == ("error", "error")
    assert reply["content"] == ("".join(TOKENS[:2]) if where == "mid" else "")
    if where != "mid":  # before the first token: a plain JSON error
        assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_error"
    elif accept == "application/json":
        assert response.json()["error"]["code"] == "upstream_error"
    else:
        assert "event: error" in response.text.rstrip().rsplit("\n\n", 1)[-1]
