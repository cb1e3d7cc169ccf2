"""The OpenAI-compatible surface, driven by the official openai SDK."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import openai
import orjson
import pytest

from gateway.edge.auth import mint_token
from storage.db import Pool
from tests.conftest import JWT_SECRET
from tests.streaming.test_dispatch import vendor_gateway
from tests.vendors import TEXT, TOOL_CALLS, TOOL_TEXT, VENDORS, VendorServer, json_format, tool_exchange


def sdk(url: str, token: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0)


@pytest.fixture
def token() -> str:
    return mint_token(JWT_SECRET, f"u-{uuid.uuid4().hex[:6]}", f"org-{uuid.uuid4().hex[:6]}")


async def test_streaming_without_usage(gateway_url: str, token: str) -> None:
    async with sdk(gateway_url, token) as client:
        stream = await client.chat.completions.create(
            model="fake/echo", messages=[{"role": "user", "content": "one two three"}], stream=True)
        chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "one two three"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


async def test_streaming_with_usage(gateway_url: str, token: str) -> None:
    async with sdk(gateway_url, token) as client:
        stream = await client.chat.completions.create(
            model="fake/echo", messages=[{"role": "system", "content": "be kind"},
                                         {"role": "user", "content": [{"type": "text", "text": "hi there"}]}],
            stream=True, stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 2
    assert chunks[-2].choices[0].finish_reason == "stop"


async def test_non_streaming(gateway_url: str, token: str, db: Pool) -> None:
    async with sdk(gateway_url, token) as client:
        completion = await client.chat.completions.create(
            model="fake/echo", messages=[{"role": "user", "content": "stop here please"}], stop=["here"],
            max_tokens=20, temperature=0.5, top_p=0.9, user="someone", seed=7)
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "stop "
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.total_tokens > 0


@pytest.mark.parametrize("vendor", VENDORS)
async def test_each_vendor_behind_the_surface(start_gateway: Any, vendors: dict[str, Any], vendor: str,
                                              token: str) -> None:
    async with vendor_gateway(start_gateway, vendors) as gateway, sdk(gateway.url, token) as client:
        stream = await client.chat.completions.create(
            model=f"{vendor}/normal", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        whole = await client.chat.completions.create(model=f"{vendor}/normal",
                                                     messages=[{"role": "user", "content": "hi"}])
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 5
    assert whole.choices[0].message.content == TEXT


TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "get_time",
                                      "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}},
]


@pytest.mark.parametrize("vendor", VENDORS)
async def test_tool_calls_through_the_surface(start_gateway: Any, vendors: dict[str, Any], vendor: str,
                                              token: str) -> None:
    server: VendorServer = vendors[vendor][0]
    ask: list[Any] = [{"role": "user", "content": "weather and time in Paris?"}]
    async with vendor_gateway(start_gateway, vendors) as gateway, sdk(gateway.url, token) as client:
        stream = await client.chat.completions.create(model=f"{vendor}/tools", messages=ask, tools=TOOLS,
                                                      stream=True, stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        whole = await client.chat.completions.create(model=f"{vendor}/tools", messages=ask, tools=TOOLS,
                                                     tool_choice="required")
        message = whole.choices[0].message
        calls = [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or ()
                 if c.type == "function"]
        answered = [*ask, {"role": "assistant", "content": message.content, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            for call_id, name, arguments in calls]}]
        answered += [{"role": "tool", "tool_call_id": call_id, "content": orjson.dumps({"ok": name}).decode()}
                     for call_id, name, _ in calls]
        after = await client.chat.completions.create(model=f"{vendor}/normal", messages=answered, tools=TOOLS)
    pieces: dict[int, list[str]] = {}
    for chunk in chunks:
        for call in (chunk.choices[0].delta.tool_calls or ()) if chunk.choices else ():
            assert call.function is not None
            if call.id is not None:
                pieces[call.index] = [call.id, call.function.name or "", ""]
            pieces[call.index][2] += call.function.arguments or ""
    expected = [(call_id, name, args) for call_id, name, args in TOOL_CALLS]
    assert [(i, n, orjson.loads(a)) for i, n, a in pieces.values()] == expected
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TOOL_TEXT
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage is not None
    assert whole.choices[0].finish_reason == "tool_calls" and message.content == TOOL_TEXT
    assert [(i, n, orjson.loads(a)) for i, n, a in calls] == expected
    assert after.choices[0].message.content == TEXT and after.choices[0].message.tool_calls is None
    exchange = tool_exchange(vendor, server.requests[-1]["body"])
    assert exchange.calls == expected and exchange.choice is None
    assert exchange.results == [(call_id, {"ok": name}) for call_id, name, _ in TOOL_CALLS]


async def test_tool_requests_that_cannot_work_are_refused(gateway_url: str, token: str) -> None:
    hi: list[Any] = [{"role": "user", "content": "hi"}]
    refused: list[dict[str, Any]] = [
        {"messages": hi, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "elsewhere"}}},
        {"messages": hi, "tool_choice": "required"},
        {"messages": [*hi, {"role": "tool", "content": "42"}], "tools": TOOLS},
        {"messages": hi, "functions": [{"name": "f", "parameters": {}}]},
        {"messages": hi, "tools": [{"type": "function", "function": {"name": "has spaces"}}]},
    ]
    async with sdk(gateway_url, token) as client:
        for extra in refused:
            with pytest.raises(openai.BadRequestError if "functions" in extra or "tool_choice" in extra
                               or extra["messages"][-1]["role"] == "tool" else openai.UnprocessableEntityError):
                await client.chat.completions.create(model="fake/echo", **extra)
        # The fake answers in text unless a call is required; then it calls the named (or first) tool.
        answer = await client.chat.completions.create(model="fake/echo", messages=hi, tools=TOOLS)
        assert answer.choices[0].message.content == "hi" and answer.choices[0].finish_reason == "stop"
        named = await client.chat.completions.create(
            model="fake/echo", messages=hi, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}})
        required = await client.chat.completions.create(model="fake/echo", messages=hi, tools=TOOLS,
                                                        tool_choice="required", stream=True)
        streamed = [c.choices[0].delta.tool_calls for c in [chunk async for chunk in required] if c.choices]
        call = (named.choices[0].message.tool_calls or [None])[0]
        assert call is not None and call.type == "function"
        assert (call.function.name, call.function.arguments, named.choices[0].finish_reason) == (
            "get_time", "{}", "tool_calls")
        first = next(calls[0] for calls in streamed if calls)
        assert first.function is not None and first.function.name == "get_weather"
        answered = await client.chat.completions.create(model="fake/echo", tools=TOOLS, tool_choice="required", messages=[
            *hi, {"role": "assistant", "tool_calls": [{"id": call.id, "type": "function",
                                                       "function": {"name": "get_time", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": call.id, "content": "12:00"}])
    assert answered.choices[0].message.content == "hi" and answered.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("vendor", VENDORS)
async def test_structured_output_through_the_surface(start_gateway: Any, vendors: dict[str, Any], vendor: str,
                                                     token: str) -> None:
    server: VendorServer = vendors[vendor][0]
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    ask: list[Any] = [{"role": "user", "content": "where?"}]
    async with vendor_gateway(start_gateway, vendors) as gateway, sdk(gateway.url, token) as client:
        answer = await client.chat.completions.create(model=f"{vendor}/normal", messages=ask, response_format={
            "type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}})
        assert answer.choices[0].message.content == TEXT
        assert json_format(vendor, server.requests[-1]["body"]) == ("json_schema", schema)
        calls = len(server.requests)
        if vendor == "anthropic":
            with pytest.raises(openai.BadRequestError) as refused:
                await client.chat.completions.create(model=f"{vendor}/normal", messages=ask,
                                                     response_format={"type": "json_object"})
            assert refused.value.param == "response_format.type" and len(server.requests) == calls
        else:
            await client.chat.completions.create(model=f"{vendor}/normal", messages=ask,
                                                 response_format={"type": "json_object"})
            assert json_format(vendor, server.requests[-1]["body"]) == ("json_object", None)
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model=f"{vendor}/normal", messages=ask,
                                                 response_format={"type": "json_schema"})  # type: ignore[typeddict-item]


async def test_errors_raise_the_matching_sdk_exception(start_gateway: Any, token: str) -> None:
    message = [{"role": "user", "content": "x"}]
    async with start_gateway(quota_user_tokens=10) as gateway, sdk(gateway.url, token) as client:
        with pytest.raises(openai.AuthenticationError):
            await sdk(gateway.url, "not-a-token").chat.completions.create(model="fake/echo", messages=message)
        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(model="nowhere/model", messages=message)
        assert missing.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(
                model="fake/echo", messages=message, functions=[{"name": "f", "parameters": {}}])
        assert bad.value.param == "functions"
        with pytest.raises(openai.UnprocessableEntityError):
            await client.chat.completions.create(model="fake/echo", messages=message, temperature=5)
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(model="fake/echo", messages=message, max_tokens=100)
        assert limited.value.code == "quota_exceeded"
        assert limited.value.response.headers["retry-after"]
        with pytest.raises(openai.InternalServerError):  # 502: the provider failed before the first token
            await client.chat.completions.create(model="fake/echo?fail_after=0&fail=401", messages=message,
                                                 max_tokens=1)


async def test_sdk_close_aborts_the_upstream_call(start_gateway: Any, vendors: dict[str, Any], token: str) -> None:
    server: VendorServer = vendors["openai"][0]
    marker = uuid.uuid4().hex[:8]
    async with vendor_gateway(start_gateway, vendors) as gateway, sdk(gateway.url, token) as client:
        async with client.chat.completions.with_streaming_response.create(
                model=f"openai/slow-{marker}", messages=[{"role": "user", "content": "x"}], stream=True) as response:
            lines = response.iter_lines()
            while not (await anext(lines)).startswith("data: ") or not server.requests:
                pass
            for _ in range(4):
                await anext(lines)
        closed_by_client = time.monotonic()
        await asyncio.wait_for(server.closed_event(marker).wait(), 0.5)
    assert server.closed[marker] - closed_by_client < 0.5


async def test_framing_matches_openai_byte_for_byte(gateway_url: str, token: str) -> None:
    async with httpx.AsyncClient(base_url=gateway_url) as http:
        response = await http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {token}"}, json={
            "model": "fake/echo", "messages": [{"role": "user", "content": "a b"}], "stream": True,
            "stream_options": {"include_usage": True}})
    raw = response.content
    assert response.headers["content-type"].startswith("text/event-stream")
    assert raw.endswith(b"data: [DONE]\n\n") and raw.count(b"[DONE]") == 1
    frames = raw.split(b"\n\n")
    assert frames[-1] == b"" and frames[-2] == b"data: [DONE]"
    chunks = [orjson.loads(frame.removeprefix(b"data: ")) for frame in frames[:-2]]
    assert all(frame.startswith(b"data: {") and b"\n" not in frame for frame in frames[:-2])
    assert [c["choices"][0]["delta"] if c["choices"] else None for c in chunks] == [
        {"role": "assistant", "content": ""}, {"content": "a "}, {"content": "b"}, {}, None]
    assert [c["choices"][0]["finish_reason"] if c["choices"] else None for c in chunks] == [
        None, None, None, "stop", None]
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["usage"]["completion_tokens"] == 2
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1


async def test_usage_goes_to_the_ledger_and_nothing_to_chats(gateway_url: str, db: Pool) -> None:
    org, user = f"org-{uuid.uuid4().hex[:6]}", f"u-{uuid.uuid4().hex[:6]}"
    async with sdk(gateway_url, mint_token(JWT_SECRET, user, org)) as client:
        await client.chat.completions.create(model="fake/echo", messages=[{"role": "user", "content": "count"}])
    rows = await db.fetch("SELECT chat_id, model, charged_tokens FROM usage_ledger WHERE org_id = $1", org)
    assert [(r["chat_id"], r["model"], r["charged_tokens"]) for r in rows] == [(None, "fake/echo", 1 + 1)]
    assert await db.fetchval("SELECT count(*) FROM chats WHERE org_id = $1", org) == 0


async def test_models_lists_every_provider_with_credentials_flag(gateway_url: str, token: str) -> None:
    async with sdk(gateway_url, token) as client:
        models = {model.id: model for model in (await client.models.list()).data}
    assert "fake/echo" in models and "openai/gpt-4o-mini" in models and "anthropic/claude-sonnet-4-5" in models
    assert models["fake/echo"].model_extra == {"has_credentials": True}
    assert models["gemini/gemini-2.5-flash"].owned_by == "gemini"
