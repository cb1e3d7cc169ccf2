"""One contract suite that every vendor adapter passes, each real SDK pointed at a local fake of its vendor.

Past 400 lines because one contract is checked against four adapters, each with its vendor's fake.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import orjson
import pytest

from providers.anthropic import AnthropicProvider
from providers.base import (
    Attachment,
    ChatMessage,
    Finish,
    Provider,
    ProviderConnectionError,
    ProviderError,
    ProviderRequest,
    ProviderStatusError,
    ProviderTimeout,
    ResponseFormat,
    StreamBatch,
    StreamEvent,
    Tool,
    ToolCall,
    ToolCallDelta,
    UpstreamConfig,
    Usage,
)
from providers.gemini import GeminiProvider
from providers.http import UpstreamCall
from providers.openai import OpenAIProvider
from tests.vendors import (
    FRAMES,
    OUTPUT_TOKENS,
    PROMPT_TOKENS,
    TEXT,
    TOKENS,
    TOOL_CALLS,
    TOOL_TEXT,
    VENDORS,
    ToolExchange,
    conversation,
    json_format,
    tool_exchange,
)

SECRET = {"openai": "sk-test-secret-openai", "anthropic": "sk-ant-test-secret", "gemini": "gm-test-secret"}


def adapter_for(
    vendor: str, url: str, idle_timeout_s: float = 0.5, key: str | None = "", max_connections: int = 10_000
) -> Provider:
    key = SECRET[vendor] if key == "" else key
    config = UpstreamConfig(connect_timeout_s=2, idle_timeout_s=idle_timeout_s, max_connections=max_connections)
    if vendor == "openai":
        return OpenAIProvider("openai", key, f"{url}/v1", config)
    if vendor == "anthropic":
        return AnthropicProvider(key, url, config)
    return GeminiProvider(key, url, config)


async def run(provider: Provider, model: str) -> tuple[list[StreamEvent], BaseException | None]:
    events: list[StreamEvent] = []
    request = ProviderRequest(model, [ChatMessage("user", "hi")], system="be brief", max_tokens=50)
    try:
        async for batch in provider.stream(request):
            assert batch, "a batch is never empty"
            events += batch
    except ProviderError as error:
        return events, error
    finally:
        await provider.aclose()
    return events, None


async def all_events(adapter: Provider, request: ProviderRequest) -> list[StreamEvent]:
    """Every event of one call, then the adapter closed."""
    try:
        return [event async for batch in adapter.stream(request) for event in batch]
    finally:
        await adapter.aclose()


def text_of(events: list[StreamEvent]) -> str:
    return "".join(e for e in events if isinstance(e, str))


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize("scenario", ["normal", "split-utf8", "crlf", "pings"])
async def test_complete_streams(vendors: dict[str, Any], vendor: str, scenario: str) -> None:
    events, error = await run(adapter_for(vendor, vendors[vendor][1]), scenario)
    assert error is None
    assert text_of(events) == TEXT
    assert [e for e in events if isinstance(e, str)] == TOKENS
    assert events[-2:] == [Usage(PROMPT_TOKENS, OUTPUT_TOKENS), Finish("stop")]


@pytest.mark.parametrize("vendor", VENDORS)
async def test_request_carries_system_prompt_limits_and_key(vendors: dict[str, Any], vendor: str) -> None:
    server, url = vendors[vendor]
    await run(adapter_for(vendor, url), "normal")
    request = server.requests[-1]
    body, headers = request["body"], request["headers"]
    if vendor == "openai":
        assert body["messages"][0] == {"role": "system", "content": "be brief"}
        assert body["max_tokens"] == 50 and body["stream_options"] == {"include_usage": True}
        assert headers["authorization"] == f"Bearer {SECRET[vendor]}"
    elif vendor == "anthropic":
        assert body["system"] == "be brief" and body["max_tokens"] == 50 and body["stream"] is True
        assert SECRET[vendor] in (headers.get("x-api-key"), headers.get("authorization", "").removeprefix("Bearer "))
    else:
        assert body["systemInstruction"]["parts"][0]["text"] == "be brief"
        assert body["generationConfig"]["maxOutputTokens"] == 50
        assert headers["x-goog-api-key"] == SECRET[vendor]


PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()
PDF = "data:application/pdf;base64," + base64.b64encode(b"%PDF-1.4\n").decode()
PHOTO = Attachment("photo.jpg", "image/jpeg", "https://files.example/photo.jpg")
REPORT = Attachment("report.pdf", "application/pdf", "https://files.example/report.pdf")


@pytest.mark.parametrize("vendor", VENDORS)
async def test_attachments_reach_the_vendor_in_its_own_format(vendors: dict[str, Any], vendor: str) -> None:
    server, url = vendors[vendor]
    adapter = adapter_for(vendor, url)
    request = ProviderRequest("normal", [
        ChatMessage("user", "look", (PHOTO, Attachment("dot.png", "image/png", PNG))),
        ChatMessage("assistant", "seen"),
        ChatMessage("user", "and these", (Attachment("paper.pdf", "application/pdf", PDF), REPORT)),
    ])
    events = await all_events(adapter, request)
    assert text_of(events) == TEXT
    turns = conversation(vendor, server.requests[-1]["body"])
    assert turns[:2] == [("user", "look", [("image", PHOTO.url), ("image", PNG)]), ("assistant", "seen", [])]
    # Chat Completions takes a PDF only as data: the link is named in the text instead.
    assert adapter.accepts(REPORT) is (vendor != "openai")
    if vendor == "openai":
        note = "\n[attachment 'report.pdf' (application/pdf) is not shown to this model]"
        assert turns[2] == ("user", "and these" + note, [("pdf", PDF)])
    else:
        assert turns[2] == ("user", "and these", [("pdf", PDF), ("pdf", REPORT.url)])


WEATHER = Tool("get_weather", "The weather in a city", {"type": "object", "properties": {"city": {"type": "string"}}})
CLOCK = Tool("get_time", None, {"type": "object", "properties": {"zone": {"type": "string"}}})


def assembled(events: list[StreamEvent]) -> list[tuple[str, str, Any]]:
    """The tool calls of a stream, each put together from its pieces: ``(id, name, arguments)``."""
    calls: dict[int, list[Any]] = {}
    for event in events:
        if isinstance(event, ToolCallDelta):
            if event.index not in calls:
                calls[event.index] = [event.id, event.name, ""]
            calls[event.index][2] += event.arguments
    return [(call_id, name, orjson.loads(arguments)) for call_id, name, arguments in calls.values()]


@pytest.mark.parametrize("vendor", VENDORS)
async def test_tool_calls_stream_in_pieces_and_the_exchange_reaches_the_vendor(
    vendors: dict[str, Any], vendor: str
) -> None:
    server, url = vendors[vendor]
    adapter = adapter_for(vendor, url)
    request = ProviderRequest("tools", [
        ChatMessage("user", "weather in Rome?"),
        ChatMessage("assistant", "", tool_calls=(ToolCall("call_0", "get_weather", '{"city": "Rome"}'),)),
        ChatMessage("tool", '{"celsius": 21}', tool_call_id="call_0"),
        ChatMessage("user", "and Paris, and the time there?"),
    ], tools=(WEATHER, CLOCK), tool_choice="auto")
    events = await all_events(adapter, request)
    assert text_of(events) == TOOL_TEXT
    assert assembled(events) == TOOL_CALLS
    assert events[-1] == Finish("tool_calls")
    exchange = tool_exchange(vendor, server.requests[-1]["body"])
    assert exchange == ToolExchange([(WEATHER.name, WEATHER.parameters), (CLOCK.name, CLOCK.parameters)], "auto",
                                    [("call_0", "get_weather", {"city": "Rome"})], [("call_0", {"celsius": 21})])


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize(("choice", "forced", "said"), [
    ("none", None, "none"), ("required", None, "required"), ("required", "get_time", "get_time")])
async def test_tool_choice_reaches_the_vendor(
    vendors: dict[str, Any], vendor: str, choice: str, forced: str | None, said: str
) -> None:
    server, url = vendors[vendor]
    adapter = adapter_for(vendor, url)
    request = ProviderRequest("normal", [ChatMessage("user", "hi")], tools=(WEATHER, CLOCK),
                              tool_choice=choice, forced_tool=forced)  # type: ignore[arg-type]
    assert text_of(await all_events(adapter, request)) == TEXT
    assert tool_exchange(vendor, server.requests[-1]["body"]).choice == said


ANSWER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
          "additionalProperties": False}


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize("fmt", [ResponseFormat("json_schema", ANSWER, "place", True), ResponseFormat("json_object")])
async def test_a_json_answer_is_asked_in_the_vendors_own_form(
    vendors: dict[str, Any], vendor: str, fmt: ResponseFormat
) -> None:
    server, url = vendors[vendor]
    adapter = adapter_for(vendor, url)
    if fmt.kind not in adapter.response_formats:
        assert vendor == "anthropic"  # Messages has no schemaless JSON mode
        return
    request = ProviderRequest("normal", [ChatMessage("user", "where?")], response_format=fmt)
    assert text_of(await all_events(adapter, request)) == TEXT
    assert json_format(vendor, server.requests[-1]["body"]) == (fmt.kind, fmt.schema)
    if vendor == "openai" and fmt.kind == "json_schema":
        assert server.requests[-1]["body"]["response_format"]["json_schema"] == {
            "name": "place", "schema": ANSWER, "strict": True}


@pytest.mark.parametrize("vendor", VENDORS)
async def test_error_frame_mid_stream(vendors: dict[str, Any], vendor: str) -> None:
    events, error = await run(adapter_for(vendor, vendors[vendor][1]), "error-frame")
    assert text_of(events) == "".join(TOKENS[:2])
    assert isinstance(error, ProviderError)


@pytest.mark.parametrize("vendor", VENDORS)
async def test_connection_dropped_mid_stream(vendors: dict[str, Any], vendor: str) -> None:
    events, error = await run(adapter_for(vendor, vendors[vendor][1]), "drop")
    assert text_of(events) == "".join(TOKENS[:2])
    assert isinstance(error, ProviderConnectionError)


@pytest.mark.parametrize("vendor", VENDORS)
async def test_stall_past_the_idle_timeout(vendors: dict[str, Any], vendor: str) -> None:
    events, error = await run(adapter_for(vendor, vendors[vendor][1], idle_timeout_s=0.3), "stall")
    assert text_of(events) == "".join(TOKENS[:2])
    assert isinstance(error, ProviderTimeout)


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize(
    ("status", "code", "retryable"),
    [(401, "upstream_auth_failed", False), (429, "upstream_rate_limited", True), (500, "upstream_error", True),
     (503, "upstream_unavailable", True), (529, "upstream_unavailable", True)],
)
async def test_error_statuses(vendors: dict[str, Any], vendor: str, status: int, code: str, retryable: bool) -> None:
    events, error = await run(adapter_for(vendor, vendors[vendor][1]), str(status))
    assert events == []
    assert isinstance(error, ProviderStatusError)
    assert (error.status, error.code, error.retryable) == (status, code, retryable)
    if status == 429:
        assert error.retry_after == 7
    assert SECRET[vendor] not in error.message and "sk-te" not in error.message


@pytest.mark.parametrize("vendor", VENDORS)
async def test_missing_key_is_an_auth_failure_without_a_call(vendors: dict[str, Any], vendor: str) -> None:
    server, url = vendors[vendor]
    before = len(server.requests)
    _, error = await run(adapter_for(vendor, url, key=None), "normal")
    assert isinstance(error, ProviderStatusError) and error.code == "upstream_auth_failed"
    assert len(server.requests) == before


class Collected:
    """A relay's sink: every batch it was handed, and how the stream ended."""

    def __init__(self) -> None:
        self.events: list[StreamEvent] = []
        self.ending: asyncio.Future[ProviderError | None] = asyncio.get_running_loop().create_future()

    def deliver(self, batch: StreamBatch) -> None:
        assert batch, "a batch is never empty"
        self.events += batch

    def ended(self, failure: ProviderError | None) -> None:
        assert not self.ending.done(), "ended is called once"
        self.ending.set_result(failure)


async def relayed(provider: Provider, model: str) -> tuple[list[StreamEvent], ProviderError | None]:
    """The first batch pulled, the rest relayed, as a stream to a client is read."""
    stream = provider.stream(ProviderRequest(model, [ChatMessage("user", "hi")]))
    try:
        first = await anext(stream)
        sink = Collected()
        stream.relay(sink)
        failure = await asyncio.wait_for(sink.ending, 5)
        return first + sink.events, failure
    finally:
        await stream.aclose()
        await provider.aclose()


@pytest.mark.parametrize("vendor", VENDORS)
async def test_relay_hands_over_every_event_then_ends(vendors: dict[str, Any], vendor: str) -> None:
    events, failure = await relayed(adapter_for(vendor, vendors[vendor][1]), "split-utf8")
    assert failure is None
    assert text_of(events) == TEXT
    assert events[-2:] == [Usage(PROMPT_TOKENS, OUTPUT_TOKENS), Finish("stop")]


@pytest.mark.parametrize("vendor", VENDORS)
async def test_relay_ends_with_the_failure_after_the_deltas_before_it(vendors: dict[str, Any], vendor: str) -> None:
    events, failure = await relayed(adapter_for(vendor, vendors[vendor][1]), "drop")
    assert isinstance(failure, ProviderConnectionError)
    assert text_of(events) == "".join(TOKENS[:2])


@pytest.mark.parametrize("vendor", VENDORS)
async def test_an_iterated_call_reads_when_its_consumer_asks(vendors: dict[str, Any], vendor: str) -> None:
    # A batch ahead of the consumer, then the connection waits: until a stream's first token has gone out,
    # the rest of an answer that came with it is not decoded in its way.
    provider = adapter_for(vendor, vendors[vendor][1])
    stream = provider.stream(ProviderRequest("stall", [ChatMessage("user", "hi")]))
    try:
        assert isinstance(stream, UpstreamCall)
        events = list(await anext(stream))
        assert stream.connection is not None and stream.connection.transport is not None
        assert not stream.connection.transport.is_reading()
        while text_of(events) != "".join(TOKENS[:2]):
            events += await anext(stream)
        with pytest.raises(ProviderTimeout):  # asked for more, it reads again, and sees the stall
            await anext(stream)
    finally:
        await stream.aclose()
        await provider.aclose()


@pytest.mark.parametrize("vendor", VENDORS)
async def test_an_answer_that_arrives_at_once_is_read_as_its_consumer_asks(
    vendors: dict[str, Any], vendor: str
) -> None:
    # One read holds the whole answer: past the first batch, it waits unread (the first token goes out
    # before the rest is worked on), then comes in order, ended, and its connection serves the next call.
    server, url = vendors[vendor]
    provider = adapter_for(vendor, url)
    try:
        for _ in range(2):
            stream = provider.stream(ProviderRequest("whole", [ChatMessage("user", "hi")]))
            assert isinstance(stream, UpstreamCall)
            events = list(await anext(stream))
            assert stream.held, "the rest of the answer was read before it was asked for"
            events += [event async for batch in stream for event in batch]
            assert text_of(events) == TEXT
            assert events[-2:] == [Usage(PROMPT_TOKENS, OUTPUT_TOKENS), Finish("stop")]
        events, failure = await relayed(provider, "whole")
        assert failure is None and text_of(events) == TEXT
    finally:
        await provider.aclose()
    clients = {r["client"] for r in server.requests[-3:]}
    assert len(clients) == 1, f"three calls, one connection: {clients}"


class MalformedAfterDeltas(asyncio.Protocol):
    """Answers any request, in one write, with two OpenAI deltas in HTTP chunks and then a chunk size that
    is not a number."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.answered = False

    def data_received(self, data: bytes) -> None:
        if self.answered:
            return
        self.answered = True
        events = [frame + b"\n\n" for frame in FRAMES["openai"](TOKENS[:2], finish=False)]
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(event), event) for event in events)
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        self.transport.write(head + chunks + b"zz\r\n")  # type: ignore[attr-defined]


async def test_a_malformed_answer_ends_after_the_deltas_read_before_it() -> None:
    # Everything arrives in one read: the first delta goes to the consumer, the second waits unread, and
    # the malformed rest ends the call only after it.
    server = await asyncio.get_running_loop().create_server(MalformedAfterDeltas, "127.0.0.1", 0)
    provider = adapter_for("openai", f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        events, failure = await run(provider, "normal")
    finally:
        await provider.aclose()
        server.close()
    assert isinstance(failure, ProviderError) and "malformed" in failure.message
    assert text_of(events) == "".join(TOKENS[:2])


async def test_a_connection_read_to_its_end_serves_the_next_call(vendors: dict[str, Any]) -> None:
    server, url = vendors["openai"]
    provider = adapter_for("openai", url)
    request = ProviderRequest("normal", [ChatMessage("user", "hi")])
    try:
        for _ in range(3):
            assert text_of([e async for batch in provider.stream(request) for e in batch]) == TEXT
    finally:
        await provider.aclose()
    clients = {r["client"] for r in server.requests[-3:]}
    assert len(clients) == 1, f"three calls, one connection: {clients}"


async def test_dropped_connections_give_their_pool_slots_back(vendors: dict[str, Any]) -> None:
    provider = adapter_for("openai", vendors["openai"][1], max_connections=1)
    for _ in range(3):  # each call needs the pool's one slot: a dropped call must have freed it
        events, failure = await asyncio.wait_for(run(provider, "drop"), 5)
        assert isinstance(failure, ProviderConnectionError)
        assert text_of(events) == "".join(TOKENS[:2])

