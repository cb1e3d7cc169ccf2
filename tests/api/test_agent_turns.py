"""Agent turns on the chat path: tools, tool results and reasoning, streamed, stored and sent back, against
each vendor's fake (the real adapters) and the fake provider.

Past 400 lines because each vendor's tools and reasoning are followed through stream, store and resend.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import httpx_sse
import orjson
import pytest

from storage.db import Pool
from tests.api.test_send import eventually, new_chat, read_events, reply_row
from tests.conftest import Gateway, auth_headers
from tests.streaming.test_dispatch import vendor_gateway
from tests.vendors import (
    BROKEN_ARGUMENTS,
    REASONING_CALL,
    REASONING_TEXT,
    REDACTED,
    SIGNATURE,
    SLOW_CALL,
    TEXT,
    TOOL_CALLS,
    TOOL_TEXT,
    VENDORS,
    SentPart,
    VendorServer,
    assistant_parts,
    tool_exchange,
)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CLOCK = {"type": "function", "function": {"name": "get_time",
                                          "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}}
NOTE = {"type": "function", "function": {"name": "write_note",
                                         "parameters": {"type": "object", "properties": {"text": {"type": "string"}}}}}
JSON = {"Accept": "application/json"}


def headers_for(name: str) -> dict[str, str]:
    return auth_headers(f"u-{name}", f"org-{uuid.uuid4().hex[:8]}")


async def send(http: httpx.AsyncClient, headers: dict[str, str], chat_id: str, **body: Any
               ) -> list[httpx_sse.ServerSentEvent]:
    async with http.stream("POST", f"/v1/chats/{chat_id}/messages", headers=headers, json=body) as response:
        assert response.status_code == 200, await response.aread()
        return [event async for event in read_events(response)]


def named(events: list[httpx_sse.ServerSentEvent], name: str) -> list[dict[str, Any]]:
    return [event.json() for event in events if event.event == name]


async def message_count(db: Pool, chat_id: str) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM messages WHERE chat_id = $1", uuid.UUID(chat_id))
    return count


# -- the tool loop per vendor ---------------------------------------------------------------------


@pytest.mark.parametrize("vendor", VENDORS)
async def test_a_two_call_tool_loop_through_the_chat_path(
    start_gateway: Any, vendors: dict[str, Any], vendor: str, db: Pool
) -> None:
    server: VendorServer = vendors[vendor][0]
    headers = headers_for("tools")
    async with vendor_gateway(start_gateway, vendors) as gateway, httpx.AsyncClient(base_url=gateway.url) as http:
        chat_id = await new_chat(http, headers, model=f"{vendor}/tools")
        events = await send(http, headers, chat_id, content="weather and time?", tools=[WEATHER, CLOCK])
        starts = named(events, "tool_call_start")
        assert [(s["id"], s["name"]) for s in starts] == [(c[0], c[1]) for c in TOOL_CALLS]
        fragments = [d["arguments"] for d in named(events, "tool_call_delta") if d["id"] == "call_1"]
        assert orjson.loads("".join(fragments)) == {"city": "Paris"} and len(fragments) == (1 if vendor == "gemini" else 2)
        assert [(c["id"], c["name"], c["input"]) for c in named(events, "tool_call")] == TOOL_CALLS
        order = [e.event for e in events if e.event in ("delta", "tool_call_start", "tool_call")]
        assert order == ["delta", "tool_call_start", "tool_call", "tool_call_start", "tool_call"]
        done = named(events, "done")[0]
        assert done["finish_reason"] == "tool_calls"
        row = await reply_row(db, done["assistant_message_id"])
        assert row["content"] == TOOL_TEXT and row["finish_reason"] == "tool_calls"
        assert row["parts"] == [{"type": "text", "text": TOOL_TEXT}, *(
            {"type": "tool-call", "tool_call_id": c, "tool_name": n, "input": a} for c, n, a in TOOL_CALLS)]

        results = [{"tool_call_id": "call_1", "output": {"celsius": 18}},
                   {"tool_call_id": "call_2", "output": {"time": "12:00"}, "is_error": False}]
        events = await send(http, headers, chat_id, tool_results=results, model=f"{vendor}/normal",
                            tools=[WEATHER, CLOCK])
    exchange = tool_exchange(vendor, server.requests[-1]["body"])
    assert exchange.calls == TOOL_CALLS
    assert exchange.results == [("call_1", {"celsius": 18}), ("call_2", {"time": "12:00"})]
    assert [t[0] for t in exchange.tools] == ["get_weather", "get_time"]
    start, done = events[0].json(), named(events, "done")[0]
    tool_row = await reply_row(db, start["user_message_id"])
    assert tool_row["role"] == "tool" and tool_row["parts"] == [
        {"type": "tool-result", "tool_call_id": "call_1", "output": {"celsius": 18}, "is_error": False},
        {"type": "tool-result", "tool_call_id": "call_2", "output": {"time": "12:00"}, "is_error": False}]
    final = await reply_row(db, done["assistant_message_id"])
    assert (final["content"], final["finish_reason"], final["parts"]) == (TEXT, "stop", [])


# What the reasoning-tools step keeps, by vendor, and what the next step gives back.
KEPT_REASONING = {
    "openai": [{"type": "reasoning", "text": REASONING_TEXT}],
    "anthropic": [{"type": "reasoning", "text": REASONING_TEXT, "signature": SIGNATURE}],
    "gemini": [{"type": "reasoning", "text": REASONING_TEXT}],
}
GIVEN_BACK = {
    "openai": [SentPart("tool-call", REASONING_CALL[0])],
    "anthropic": [SentPart("reasoning", REASONING_TEXT, SIGNATURE), SentPart("tool-call", REASONING_CALL[0])],
    "gemini": [SentPart("reasoning", REASONING_TEXT), SentPart("tool-call", REASONING_CALL[0], SIGNATURE)],
}
FINAL_PARTS = {
    "openai": [{"type": "reasoning", "text": REASONING_TEXT}, {"type": "text", "text": TEXT}],
    "anthropic": [{"type": "reasoning", "text": REASONING_TEXT, "signature": SIGNATURE},
                  {"type": "reasoning", "text": "", "redacted": REDACTED}, {"type": "text", "text": TEXT}],
    "gemini": [{"type": "reasoning", "text": REASONING_TEXT}, {"type": "text", "text": TEXT},
               {"type": "reasoning", "text": "", "signature": SIGNATURE}],
}


@pytest.mark.parametrize(("vendor", "answer"), [*((v, "reasoning") for v in VENDORS), ("openai", "reasoning-alt")])
async def test_a_reasoning_tool_loop_streams_stores_and_gives_the_reasoning_back(
    start_gateway: Any, vendors: dict[str, Any], vendor: str, answer: str, db: Pool
) -> None:
    server: VendorServer = vendors[vendor][0]
    headers = headers_for("think")
    async with vendor_gateway(start_gateway, vendors) as gateway, httpx.AsyncClient(base_url=gateway.url) as http:
        chat_id = await new_chat(http, headers, model=f"{vendor}/reasoning-tools")
        events = await send(http, headers, chat_id, content="weather in Paris?", tools=[WEATHER],
                            reasoning_effort="medium")
        assert "".join(r["text"] for r in named(events, "reasoning")) == REASONING_TEXT
        assert [e.event for e in events].index("reasoning") < [e.event for e in events].index("tool_call_start")
        assert [(c["id"], c["name"], c["input"]) for c in named(events, "tool_call")] == [REASONING_CALL]
        first = named(events, "done")[0]
        assert first["finish_reason"] == "tool_calls"
        row = await reply_row(db, first["assistant_message_id"])
        call_part = {"type": "tool-call", "tool_call_id": REASONING_CALL[0], "tool_name": REASONING_CALL[1],
                     "input": REASONING_CALL[2]}
        signature = [{"type": "reasoning", "text": "", "signature": SIGNATURE}] if vendor == "gemini" else []
        assert row["parts"] == [*KEPT_REASONING[vendor], call_part, *signature]
        assert row["metadata"]["reasoning_effort"] == "medium"

        events = await send(http, headers, chat_id, model=f"{vendor}/{answer}", reasoning_effort="medium",
                            tool_results=[{"tool_call_id": REASONING_CALL[0], "output": {"celsius": 18}}])
    body = server.requests[-1]["body"]
    assert assistant_parts(vendor, body) == [GIVEN_BACK[vendor]]
    assert tool_exchange(vendor, body).results == [(REASONING_CALL[0], {"celsius": 18})]
    assert "".join(r["text"] for r in named(events, "reasoning")) == REASONING_TEXT
    done = named(events, "done")[0]
    final = await reply_row(db, done["assistant_message_id"])
    assert (final["content"], final["parts"]) == (TEXT, FINAL_PARTS[vendor])
    reported = None if vendor == "anthropic" else 7
    assert final["reasoning_tokens"] == reported and done["usage"].get("reasoning_tokens") == reported


async def test_reasoning_goes_back_only_to_the_provider_that_made_it(
    start_gateway: Any, vendors: dict[str, Any], db: Pool
) -> None:
    server: VendorServer = vendors["gemini"][0]
    headers = headers_for("switch")
    async with vendor_gateway(start_gateway, vendors) as gateway, httpx.AsyncClient(base_url=gateway.url) as http:
        chat_id = await new_chat(http, headers, model="anthropic/reasoning-tools")
        await send(http, headers, chat_id, content="weather?", tools=[WEATHER], reasoning_effort="low")
        await send(http, headers, chat_id, model="gemini/normal",
                   tool_results=[{"tool_call_id": REASONING_CALL[0], "output": {"celsius": 18}}])
    assert assistant_parts("gemini", server.requests[-1]["body"]) == [[SentPart("tool-call", REASONING_CALL[0])]]


# -- endings keep what came ------------------------------------------------------------------------


async def reasoning_until(events: Any, count: int) -> None:
    seen = 0
    async for event in events:
        seen += event.event == "reasoning"
        if seen == count:
            return
    raise AssertionError("the stream ended early")


@pytest.mark.parametrize("ending", ["cancelled", "client_disconnected"])
async def test_an_ending_in_the_middle_of_reasoning_keeps_it(
    client: httpx.AsyncClient, gateway: Gateway, db: Pool, ending: str
) -> None:
    headers = headers_for("midthought")
    chat_id = await new_chat(client, headers, model="fake/think?gap_ms=100")
    message = " ".join(f"w{n}" for n in range(40))
    async with client.stream("POST", f"/v1/chats/{chat_id}/messages", headers=headers,
                             json={"content": message}) as response:
        events = read_events(response)
        start = (await anext(events)).json()
        turn = gateway.services.streams.turns[uuid.UUID(chat_id)]
        await reasoning_until(events, 3)
        if ending == "cancelled":
            assert (await client.post(f"/v1/chats/{chat_id}/stop", headers=headers)).status_code == 200
            rest = [event async for event in events]
            assert rest[-1].event == "done" and rest[-1].json()["finish_reason"] == "cancelled"
    await turn.finished()
    row = await reply_row(db, start["assistant_message_id"])
    assert (row["status"], row["finish_reason"], row["content"]) == ("cancelled", ending, "")
    [part] = row["parts"]
    assert part["type"] == "reasoning" and part["text"].startswith("Thinking about: w0")
    assert "signature" not in part and len(part["text"]) < len(message)


@pytest.mark.parametrize("vendor", ["openai", "anthropic"])
@pytest.mark.parametrize("ending", ["cancelled", "client_disconnected"])
async def test_an_ending_in_the_middle_of_a_calls_arguments_keeps_them_raw(
    start_gateway: Any, vendors: dict[str, Any], vendor: str, ending: str, db: Pool
) -> None:
    headers = headers_for("midcall")
    marker = uuid.uuid4().hex[:8]
    async with vendor_gateway(start_gateway, vendors) as gateway, httpx.AsyncClient(base_url=gateway.url) as http:
        chat_id = await new_chat(http, headers, model=f"{vendor}/slow-tools-{marker}")
        async with http.stream("POST", f"/v1/chats/{chat_id}/messages", headers=headers,
                               json={"content": "note", "tools": [NOTE]}) as response:
            events = read_events(response)
            start = (await anext(events)).json()
            turn = gateway.services.streams.turns[uuid.UUID(chat_id)]
            deltas = 0
            async for event in events:
                deltas += event.event == "tool_call_delta"
                if deltas == 4:
                    break
            if ending == "cancelled":
                assert (await http.post(f"/v1/chats/{chat_id}/stop", headers=headers)).status_code == 200
                rest = [event async for event in events]
                [call] = named(rest, "tool_call")
                assert call["id"] == SLOW_CALL[0] and "input_error" in call and rest[-1].event == "done"
        await turn.finished()
    row = await reply_row(db, start["assistant_message_id"])
    assert (row["status"], row["finish_reason"]) == ("cancelled", ending)
    [part] = row["parts"]
    assert (part["type"], part["tool_call_id"], part["tool_name"]) == ("tool-call", *SLOW_CALL)
    assert part["input"].startswith('{"text": "t0 t1 ') and "input_error" in part


async def test_a_failure_after_reasoning_keeps_the_reasoning_and_text(client: httpx.AsyncClient, db: Pool) -> None:
    headers = headers_for("fails")
    chat_id = await new_chat(client, headers, model="fake/think?fail_after=1&fail=503")
    events = await send(client, headers, chat_id, content="hi there")
    assert events[-1].event == "error" and named(events, "reasoning")
    row = await reply_row(db, events[0].json()["assistant_message_id"])
    assert (row["status"], row["content"]) == ("error", "hi ")
    assert row["parts"] == [{"type": "reasoning", "text": "Thinking about: hi there", "signature": "fake-think-signature"},
                            {"type": "text", "text": "hi "}]


async def test_reasoning_grows_the_reservation_and_ends_the_turn_when_the_budget_is_spent(
    start_gateway: Any, db: Pool
) -> None:
    """Reasoning is output: past the reservation's mark it asks the budgets for more, as text does; refused,
    the turn ends there, mid-reasoning, with ``quota_exceeded`` and what came kept."""
    headers = headers_for("grow")
    message = " ".join(f"w{n}" for n in range(30))
    async with start_gateway(quota_user_tokens=60, quota_default_max_tokens=4) as gateway, \
            httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        chat_id = await new_chat(http, headers, model="fake/think?gap_ms=20")
        events = await send(http, headers, chat_id, content=message)
    assert (events[-1].event, events[-1].json()["code"]) == ("error", "quota_exceeded")
    assert named(events, "reasoning") and not named(events, "delta")
    row = await reply_row(db, events[0].json()["assistant_message_id"])
    [part] = row["parts"]
    assert row["status"] == "error" and part["type"] == "reasoning" and "signature" not in part


async def test_a_checkpoint_keeps_the_parts_of_a_reply_still_streaming(
    client: httpx.AsyncClient, db: Pool
) -> None:
    headers = headers_for("checkpoint")
    chat_id = await new_chat(client, headers, model="fake/think?gap_ms=60")
    async with client.stream("POST", f"/v1/chats/{chat_id}/messages", headers=headers,
                             json={"content": " ".join(f"w{n}" for n in range(40))}) as response:
        events = read_events(response)
        start = (await anext(events)).json()
        message_id = uuid.UUID(start["assistant_message_id"])

        async def reasoning_stored() -> bool:
            parts = await db.fetchval("SELECT parts FROM messages WHERE id = $1 AND status = 'streaming'", message_id)
            return bool(parts) and parts[0]["type"] == "reasoning" and len(parts[0]["text"]) > 20

        await eventually(reasoning_stored)
        assert (await client.post(f"/v1/chats/{chat_id}/stop", headers=headers)).status_code == 200
        [event async for event in events]


async def test_a_call_whose_arguments_are_not_json_is_kept_raw_and_can_be_answered(
    start_gateway: Any, vendors: dict[str, Any], db: Pool
) -> None:
    server: VendorServer = vendors["openai"][0]
    headers = headers_for("broken")
    async with vendor_gateway(start_gateway, vendors) as gateway, httpx.AsyncClient(base_url=gateway.url) as http:
        chat_id = await new_chat(http, headers, model="openai/tools-broken")
        events = await send(http, headers, chat_id, content="weather?", tools=[WEATHER])
        [call] = named(events, "tool_call")
        assert call["input"] == BROKEN_ARGUMENTS and "not JSON" in call["input_error"]
        done = named(events, "done")[0]
        assert done["finish_reason"] == "tool_calls"
        [part] = (await reply_row(db, done["assistant_message_id"]))["parts"]
        assert (part["input"], part["input_error"]) == (BROKEN_ARGUMENTS, call["input_error"])
        await send(http, headers, chat_id, model="openai/normal",
                   tool_results=[{"tool_call_id": "call_b", "output": "bad arguments", "is_error": True}])
    exchange = tool_exchange("openai", server.requests[-1]["body"])
    assert exchange.calls == [("call_b", "get_weather", {})]
    assert exchange.results == [("call_b", {"error": "bad arguments"})]


# -- a chat's defaults, the fake's loop and JSON answers --------------------------------------------


async def test_a_chats_default_tools_and_effort_serve_a_send_that_names_none(
    client: httpx.AsyncClient, db: Pool
) -> None:
    headers = headers_for("defaults")
    chat_id = await new_chat(client, headers, model="fake/think")
    patch = {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
             "reasoning_effort": "low"}
    patched = await client.patch(f"/v1/chats/{chat_id}", headers=headers, json=patch)
    assert patched.status_code == 200
    assert (patched.json()["tools"], patched.json()["tool_choice"], patched.json()["reasoning_effort"]) == (
        [WEATHER], patch["tool_choice"], "low")
    answer = (await client.post(f"/v1/chats/{chat_id}/messages", headers={**headers, **JSON},
                                json={"content": "weather please"})).json()
    reply = answer["assistant_message"]
    assert reply["finish_reason"] == "tool_calls" and reply["metadata"]["reasoning_effort"] == "low"
    assert [p["type"] for p in reply["parts"]] == ["reasoning", "tool-call"]
    assert reply["parts"][1]["tool_name"] == "get_weather" and reply["usage"]["reasoning_tokens"] == 4
    call_id = reply["parts"][1]["tool_call_id"]
    second = (await client.post(f"/v1/chats/{chat_id}/messages", headers={**headers, **JSON},
                                json={"tool_results": [{"tool_call_id": call_id, "output": "18 C"}]})).json()
    assert second["user_message"]["role"] == "tool"
    assert second["assistant_message"]["content"] == "weather please"
    cleared = await client.patch(f"/v1/chats/{chat_id}", headers=headers, json={"tools": None, "tool_choice": None})
    assert cleared.json()["tools"] is None and cleared.json()["reasoning_effort"] == "low"
    assert await message_count(db, chat_id) == 4


# -- refusals ----------------------------------------------------------------------------------------


def deep(levels: int) -> Any:
    """JSON nested ``levels`` deep: more than it can be written back as past 255."""
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


BAD_SENDS = [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                               "properties": {"a": {"type": 5}}}}}]},
     ["tools", 0, "function", "parameters"]),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     ["tools", 0, "function", "parameters"]),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "$schema": 5}}}]},
     ["tools", 0, "function", "parameters"]),
    ({"tools": [WEATHER, WEATHER]}, ["tools", 1, "function", "name"]),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     ["tool_choice", "function", "name"]),
    ({"tool_choice": "required"}, ["tool_choice"]),
    ({"reasoning_effort": "extreme"}, ["reasoning_effort"]),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"default": deep(300)}}}}}]}, ["tools", 0, "function", "parameters"]),
]


@pytest.mark.parametrize(("extra", "loc"), BAD_SENDS)
async def test_bad_tools_and_effort_are_refused_and_store_nothing(
    client: httpx.AsyncClient, db: Pool, extra: dict[str, Any], loc: list[Any]
) -> None:
    headers = headers_for("bad")
    chat_id = await new_chat(client, headers)
    response = await client.post(f"/v1/chats/{chat_id}/messages", headers=headers, json={"content": "hi", **extra})
    assert response.status_code == 422, response.text
    assert loc in [detail["loc"] for detail in response.json()["error"]["details"]]
    assert await message_count(db, chat_id) == 0


async def test_a_bad_default_is_refused_by_the_patch(client: httpx.AsyncClient) -> None:
    headers = headers_for("badpatch")
    chat_id = await new_chat(client, headers)
    for body in ({"reasoning_effort": "huge"}, {"tools": [WEATHER, WEATHER]}):
        response = await client.patch(f"/v1/chats/{chat_id}", headers=headers, json=body)
        assert response.status_code == 422
    assert (await client.get(f"/v1/chats/{chat_id}", headers=headers)).json()["tools"] is None


async def pending_two_calls(http: httpx.AsyncClient, headers: dict[str, str]) -> str:
    chat_id = await new_chat(http, headers, model="openai/tools")
    await send(http, headers, chat_id, content="weather and time?", tools=[WEATHER, CLOCK])
    return chat_id


async def test_tool_results_are_checked_against_the_calls_waiting(
    start_gateway: Any, vendors: dict[str, Any], db: Pool
) -> None:
    headers = headers_for("results")
    async with vendor_gateway(start_gateway, vendors) as gateway, httpx.AsyncClient(base_url=gateway.url) as http:
        chat_id = await pending_two_calls(http, headers)
        url = f"/v1/chats/{chat_id}/messages"
        both = [{"tool_call_id": "call_1", "output": 1}, {"tool_call_id": "call_2", "output": 2}]
        refusals = [
            ([{"tool_call_id": "call_9", "output": 1}, both[1]], ["tool_results", 0, "tool_call_id"]),
            ([both[0]], ["tool_results"]),  # call_2 left without its result
            ([both[0], both[0]], ["tool_results", 1, "tool_call_id"]),
            ([], ["tool_results"]),
            ([{"tool_call_id": "call_1", "output": deep(300)}, both[1]], ["tool_results", 0, "output"]),
        ]
        for results, loc in refusals:
            response = await http.post(url, headers=headers, json={"tool_results": results})
            assert response.status_code == 422, response.text
            assert response.json()["error"]["details"][0]["loc"] == loc
        assert await message_count(db, chat_id) == 2
        done = await http.post(url, headers={**headers, **JSON}, json={"tool_results": both, "model": "openai/normal"})
        assert done.status_code == 200 and done.json()["assistant_message"]["content"] == TEXT
        again = await http.post(url, headers=headers, json={"tool_results": both})
        assert again.status_code == 409 and again.json()["error"]["code"] == "no_pending_tool_calls"
    assert await message_count(db, chat_id) == 4


async def test_tool_results_where_nothing_waits_are_a_conflict(client: httpx.AsyncClient, db: Pool) -> None:
    headers = headers_for("nothing")
    chat_id = await new_chat(client, headers)
    url = f"/v1/chats/{chat_id}/messages"
    response = await client.post(url, headers=headers, json={"tool_results": [{"tool_call_id": "x", "output": 1}]})
    assert response.status_code == 409 and response.json()["error"]["code"] == "no_pending_tool_calls"
    assert (await client.post(url, headers=headers, json={})).status_code == 422  # no content, no results
    assert await message_count(db, chat_id) == 0


async def test_a_message_instead_of_results_leaves_the_calls_out_of_history(
    start_gateway: Any, vendors: dict[str, Any]
) -> None:
    server: VendorServer = vendors["openai"][0]
    headers = headers_for("skip")
    async with vendor_gateway(start_gateway, vendors) as gateway, httpx.AsyncClient(base_url=gateway.url) as http:
        chat_id = await pending_two_calls(http, headers)
        await send(http, headers, chat_id, content="never mind", model="openai/normal")
    messages = server.requests[-1]["body"]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert "tool_calls" not in messages[1] and messages[1]["content"] == TOOL_TEXT


# -- the OpenAI-compatible surface ---------------------------------------------------------------------


async def test_compat_streams_reasoning_content_and_counts_its_tokens(
    start_gateway: Any, vendors: dict[str, Any]
) -> None:
    headers = headers_for("compat")
    body = {"model": "openai/reasoning", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": True}, "reasoning_effort": "high"}
    async with vendor_gateway(start_gateway, vendors) as gateway, httpx.AsyncClient(base_url=gateway.url) as http:
        streamed = await http.post("/v1/chat/completions", headers=headers, json=body)
        whole = await http.post("/v1/chat/completions", headers=headers, json={**body, "stream": False})
    assert vendors["openai"][0].requests[-1]["body"]["reasoning_effort"] == "high"
    chunks = [orjson.loads(line[6:]) for line in streamed.text.split("\n\n") if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == REASONING_TEXT
    assert "".join(d.get("content") or "" for d in deltas) == TEXT
    assert chunks[-1]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 7}
    message = whole.json()["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == (REASONING_TEXT, TEXT)
    assert whole.json()["usage"]["completion_tokens_details"]["reasoning_tokens"] == 7
