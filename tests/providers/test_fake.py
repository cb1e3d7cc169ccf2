"""The fake provider: its options bounded and checked before anything is reserved, its output bounded by
``max_tokens``, and its largest reply made lazily without holding the event loop."""

from __future__ import annotations

import asyncio
import itertools
import time
import tracemalloc
import uuid
from typing import Any

import httpx
import pytest

from providers.base import ChatMessage, Finish, InvalidModelOptions, ProviderError, ProviderRequest, Usage
from providers.fake import BATCH_TOKENS, MAX_REPLY_TOKENS, FakeProvider
from tests.api.test_send import read_events
from tests.conftest import Gateway

LARGEST = f"fake/echo?tokens={MAX_REPLY_TOKENS}"


async def held(client: httpx.AsyncClient, headers: dict[str, str]) -> tuple[int, int]:
    """What the caller holds: tokens reserved and streams active."""
    report: dict[str, Any] = (await client.get("/v1/usage", headers=headers)).json()
    return report["user_tokens"]["reserved"], report["concurrent_streams"]["active"]


@pytest.mark.parametrize(
    ("model", "option"),
    [
        ("fake/echo?tokens=-1", "tokens"),
        (f"fake/echo?tokens={MAX_REPLY_TOKENS + 1}", "tokens"),
        ("fake/echo?tokens=abc", "tokens"),
        ("fake/echo?gap_ms=1e9", "gap_ms"),
        ("fake/echo?finish=anything", "finish"),
        ("fake/echo?fail=abc", "fail"),
        ("fake/echo?unknown=1", "unknown"),
    ],
)
async def test_fake_options_out_of_range_are_a_422_naming_the_model(
    client: httpx.AsyncClient, alice: dict[str, str], model: str, option: str
) -> None:
    response = await client.post("/v1/chat", headers=alice, json={"message": "hi", "model": model})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert error["details"][0]["loc"] == ["model"] and option in error["details"][0]["msg"]
    assert await held(client, alice) == (0, 0)


async def test_a_fake_model_other_than_echo_is_404_and_reserves_nothing(
    client: httpx.AsyncClient, alice: dict[str, str]
) -> None:
    response = await client.post("/v1/chat", headers=alice, json={"message": "hi", "model": "fake/other"})
    assert (response.status_code, response.json()["error"]["code"]) == (404, "model_not_found")
    assert await held(client, alice) == (0, 0)


def test_every_option_is_accepted_up_to_the_end_of_its_range() -> None:
    fake = FakeProvider()
    fake.check_model(f"echo?tokens={MAX_REPLY_TOKENS}&gap_ms=60000&ttft_ms=60000&fail_after={MAX_REPLY_TOKENS}"
                     "&fail=599&finish=tool_calls&usage=false")
    fake.check_model("echo?tokens=0&gap_ms=0&ttft_ms=0&fail_after=0&fail=400&finish=content_filter&usage=1")
    fake.check_model("echo?fail=connection&finish=length&usage=TRUE")
    fake.check_model("echo?fail=timeout&usage=0")
    for model in ("echo?gap_ms=60001", "echo?fail=399", "echo?fail=600", "echo?usage=2", "echo?tokens=1&tokens=2",
                  "echo?tokens", "echo?tokens=+5", "echo?tokens=" + "9" * 5000):
        with pytest.raises(InvalidModelOptions):
            fake.check_model(model)


async def stream_chat(client: httpx.AsyncClient, headers: dict[str, str], body: dict[str, Any]) -> list[Any]:
    async with client.stream("POST", "/v1/chat", headers=headers, json=body) as response:
        assert response.status_code == 200
        return [event async for event in read_events(response)]


async def test_the_fake_stops_at_max_tokens_with_length(client: httpx.AsyncClient, alice: dict[str, str]) -> None:
    events = await stream_chat(client, alice, {"message": "hi there", "model": LARGEST, "max_tokens": 10})
    deltas = [event.json()["text"] for event in events if event.event == "delta"]
    done = events[-1].json()
    assert len(deltas) == 10 and "".join(deltas) == "hi there " * 5
    assert (events[-1].event, done["finish_reason"], done["usage"]["output_tokens"]) == ("done", "length", 10)


async def test_a_reply_that_fits_max_tokens_finishes_as_asked(client: httpx.AsyncClient, alice: dict[str, str]) -> None:
    body = {"message": "hi there", "model": "fake/echo?tokens=10&finish=content_filter", "max_tokens": 10}
    events = await stream_chat(client, alice, body)
    assert len([event for event in events if event.event == "delta"]) == 10
    assert events[-1].json()["finish_reason"] == "content_filter"


async def test_health_stays_fast_while_the_fake_streams_its_largest_reply(
    gateway: Gateway, client: httpx.AsyncClient, alice: dict[str, str]
) -> None:
    prompt = f"health {uuid.uuid4().hex} stays fast"
    body = {"message": prompt, "model": LARGEST, "max_tokens": MAX_REPLY_TOKENS}
    async with client.stream("POST", "/v1/chat", headers=alice, json=body) as response:
        chunks = response.aiter_raw()
        assert b"event: start" in await anext(chunks)
        record = gateway.fake.find(prompt)
        latencies = []
        async with httpx.AsyncClient(base_url=gateway.url) as probe:
            for _ in range(100):
                began = time.perf_counter()
                assert (await probe.get("/health")).status_code == 200
                latencies.append(time.perf_counter() - began)
        overlapped = record.outcome == "open"
        tail = [chunk async for chunk in chunks][-1]
    assert overlapped, "the reply ended before the last /health: measure against a longer one"
    assert b"event: done" in tail and record.tokens_sent == MAX_REPLY_TOKENS
    assert sorted(latencies)[98] < 0.05, f"p99 {sorted(latencies)[98] * 1000:.1f} ms"


def request(model: str, **fields: Any) -> ProviderRequest:
    return ProviderRequest(model, [ChatMessage("user", "a b c")], **fields)


async def test_the_fake_never_holds_the_whole_reply() -> None:
    """The reply is made as it goes out, in batches of at most BATCH_TOKENS: the old list of the whole
    reply (800 KB of pointers alone, at the largest) showed in the peak."""
    batches: list[int] = []
    ending: list[Any] = []
    tracemalloc.start()
    try:
        async for batch in FakeProvider().stream(request(f"echo?tokens={MAX_REPLY_TOKENS}")):
            batches.append(len(batch))
            if isinstance(batch[-1], Finish):
                ending = batch
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert max(batches) == BATCH_TOKENS
    assert sum(batches[:-1]) == MAX_REPLY_TOKENS
    assert ending == [Usage(1, MAX_REPLY_TOKENS), Finish("stop")]
    assert peak < 256 * 1024, f"peak {peak} bytes"


async def test_an_unpaced_reply_gives_the_event_loop_a_turn_between_batches() -> None:
    """A consumer that awaits nothing else (the gateway's relay) still lets the loop run other tasks: a
    generator that never suspends held the loop for a whole reply."""
    ticks = 0
    streaming = True

    async def tick() -> None:
        nonlocal ticks
        while streaming:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(tick())
    seen = [ticks async for _ in FakeProvider().stream(request(f"echo?tokens={MAX_REPLY_TOKENS}"))]
    streaming = False
    await ticker
    assert len(seen) > MAX_REPLY_TOKENS // BATCH_TOKENS
    assert all(later > earlier for earlier, later in itertools.pairwise(seen[:-1]))


async def test_bad_options_given_with_the_request_fail_its_stream_with_a_provider_error() -> None:
    for options in ({"fail_after": 0, "fail": "abc"}, {"tokens": True}, {"finish": "anything"}, {"surprise": 1}):
        with pytest.raises(ProviderError):
            await anext(aiter(FakeProvider().stream(request("echo", options=options))))


async def test_options_given_with_the_request_override_the_model_names() -> None:
    batches = [batch async for batch in FakeProvider().stream(request("echo?tokens=3", options={"tokens": 5}))]
    assert batches == [["a ", "b ", "c ", "a ", "b "], [Usage(1, 5), Finish("stop")]]


async def test_a_stop_sequence_ends_the_reply_inside_a_batch() -> None:
    fake = FakeProvider()
    batches = [batch async for batch in fake.stream(request("echo?tokens=100", stop=("c",), max_tokens=50))]
    assert batches == [["a ", "b "], [Usage(1, 2), Finish("stop")]]
    assert fake.records[-1].outcome == "complete"


async def test_fail_after_sends_the_tokens_before_it_then_fails() -> None:
    fake = FakeProvider()
    stream = fake.stream(request("echo?tokens=100&fail_after=70&fail=timeout"))
    sent = [len(await anext(stream)), len(await anext(stream))]
    with pytest.raises(ProviderError) as failure:
        await anext(stream)
    assert sent == [BATCH_TOKENS, 70 - BATCH_TOKENS] and failure.value.code == "upstream_timeout"
    assert (fake.records[-1].outcome, fake.records[-1].tokens_sent) == ("failed", 70)
