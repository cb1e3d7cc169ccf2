"""The AI SDK UI message stream, driven by the real ``ai`` npm package (DefaultChatTransport)."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.api.ui_stream import chat_id_for
from gateway.edge.auth import mint_token
from storage.chats import Owner
from storage.db import Pool
from tests.conftest import JWT_SECRET, auth_headers

JS = Path(__file__).parent.parent / "js"


@pytest.fixture(scope="session")
async def node_ai() -> Path:
    """The pinned ``ai`` package, installed from tests/js/package-lock.json when missing."""
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node and npm, "Node.js and npm are needed for the AI SDK test"
    if not (JS / "node_modules" / "ai").is_dir():
        process = await asyncio.create_subprocess_exec(npm, "ci", "--no-audit", "--no-fund", cwd=JS)
        assert await process.wait() == 0, "npm ci failed in tests/js"
    return Path(node)


async def run_transport(node: Path, url: str, token: str, chat_id: str, mode: str, model: str) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        str(node), "ui_chat.mjs", url, token, chat_id, mode, model, cwd=JS,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    result: dict[str, Any] = orjson.loads(out.splitlines()[-1])
    return result


async def test_whole_reply_through_the_sdk(node_ai: Path, gateway_url: str, db: Pool) -> None:
    owner = Owner(f"org-{uuid.uuid4().hex[:6]}", "sdk-user")
    token = mint_token(JWT_SECRET, owner.user_id, owner.org_id)
    result = await run_transport(node_ai, gateway_url, token, "client-chat-1", "full", "fake/echo")
    message = result["message"]
    assert message["role"] == "assistant"
    assert message["parts"][0]["text"] == "stream me some words please"
    assert message["metadata"]["usage"]["outputTokens"] == 5
    assert result["types"][:2] == ["start", "text-start"] and result["types"][-2:] == ["text-end", "finish"]
    rows = await db.fetch("SELECT role, content, status FROM messages WHERE chat_id = $1 ORDER BY seq",
                          chat_id_for(owner, "client-chat-1"))
    assert [tuple(r) for r in rows] == [("user", "stream me some words please", "complete"),
                                        ("assistant", "stream me some words please", "complete")]
    assistant_id = await db.fetchval("SELECT id FROM messages WHERE chat_id = $1 AND role = 'assistant'",
                                     chat_id_for(owner, "client-chat-1"))
    assert message["id"] == str(assistant_id)


async def test_stop_in_the_sdk_keeps_the_partial_reply(node_ai: Path, gateway: Any, db: Pool) -> None:
    owner = Owner(f"org-{uuid.uuid4().hex[:6]}", "sdk-user")
    token = mint_token(JWT_SECRET, owner.user_id, owner.org_id)
    result = await run_transport(node_ai, gateway.url, token, "client-chat-2", "abort", "fake/echo?tokens=300&gap_ms=20")
    assert result["types"].count("text-delta") >= 3 and "finish" not in result["types"]
    chat_id = chat_id_for(owner, "client-chat-2")
    turn = gateway.services.streams.turns.get(chat_id)
    if turn is not None:
        await turn.finished()
    row = await db.fetchrow("SELECT status, finish_reason, content FROM messages WHERE chat_id = $1 AND "
                            "role = 'assistant'", chat_id)
    assert row is not None
    assert (row["status"], row["finish_reason"]) == ("cancelled", "client_disconnected")
    assert row["content"].startswith("stream me some ") and len(row["content"]) < 300 * 8


async def test_resume_answers_204_and_headers_name_the_protocol(client: httpx.AsyncClient,
                                                                 alice: dict[str, str]) -> None:
    assert (await client.get("/v1/ui/chat/anything/stream", headers=alice)).status_code == 204
    response = await client.post("/v1/ui/chat", headers=alice, json={
        "id": "c1", "trigger": "submit-message", "messageId": None,
        "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}]})
    assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
    assert response.text.endswith("data: [DONE]\n\n")
    bad = await client.post("/v1/ui/chat", headers=alice, json={"id": "c1", "messages": []})
    assert bad.status_code == 422


async def test_a_refused_first_turn_leaves_no_chat(client: httpx.AsyncClient) -> None:
    headers = auth_headers(f"u-{uuid.uuid4().hex[:6]}", f"org-{uuid.uuid4().hex[:6]}")
    message = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}
    refused = await client.post("/v1/ui/chat", headers=headers, json={
        "id": "new-chat", "model": "nowhere/model", "messages": [message]})
    assert refused.status_code == 404, refused.text
    assert (await client.get("/v1/chats", headers=headers)).json()["total"] == 0
    answered = await client.post("/v1/ui/chat", headers=headers, json={"id": "new-chat", "messages": [message]})
    assert answered.text.endswith("data: [DONE]\n\n")
    assert (await client.get("/v1/chats", headers=headers)).json()["total"] == 1


async def test_a_client_side_tool_loop_through_the_sdk(node_ai: Path, gateway_url: str, db: Pool) -> None:
    """useChat's loop: the call streamed as tool input, run on the client (addToolOutput), the conversation
    posted again by sendAutomaticallyWhen, its output stored as the chat's tool result, and the answer
    streamed after the reasoning, all in the one assistant UI message."""
    owner = Owner(f"org-{uuid.uuid4().hex[:6]}", "sdk-user")
    token = mint_token(JWT_SECRET, owner.user_id, owner.org_id)
    process = await asyncio.create_subprocess_exec(
        str(node_ai), "ui_tools.mjs", gateway_url, token, "client-tools-1", "fake/think", cwd=JS,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    result = orjson.loads(out.splitlines()[-1])
    parts = result["message"]["parts"]
    assert [p["type"] for p in parts] == ["step-start", "reasoning", "tool-get_weather", "step-start", "reasoning",
                                          "text"]
    call = parts[2]
    assert (call["state"], call["input"], call["output"]) == ("output-available", {}, {"celsius": 18})
    assert parts[1]["text"].startswith("Thinking about: weather") and parts[5]["text"] == "weather in Paris please"
    resent = result["posted"][1]["messages"][-1]
    assert resent["role"] == "assistant" and resent["parts"][2]["state"] == "output-available"
    rows = await db.fetch("SELECT role, parts, finish_reason FROM messages WHERE chat_id = $1 ORDER BY seq",
                          chat_id_for(owner, "client-tools-1"))
    assert [(r["role"], r["finish_reason"]) for r in rows] == [
        ("user", None), ("assistant", "tool_calls"), ("tool", None), ("assistant", "stop")]
    assert rows[2]["parts"] == [{"type": "tool-result", "tool_call_id": call["toolCallId"], "output": {"celsius": 18},
                                 "is_error": False}]
    assert [p["type"] for p in rows[3]["parts"]] == ["reasoning", "text"]


async def start_resume(node: Path, url: str, token: str, chat_id: str, mode: str,
                       model: str = "fake/echo") -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        str(node), "ui_resume.mjs", url, token, chat_id, mode, model, cwd=JS,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def next_line(process: asyncio.subprocess.Process) -> dict[str, Any]:
    """The script's next JSON line; its error output when it ended first."""
    assert process.stdout is not None and process.stderr is not None
    line = await asyncio.wait_for(process.stdout.readline(), 60)
    if not line:
        raise AssertionError((await process.stderr.read()).decode())
    value: dict[str, Any] = orjson.loads(line)
    return value


async def test_a_turn_left_mid_answer_is_resumed_through_the_sdk(node_ai: Path, gateway_url: str, db: Pool) -> None:
    """useChat's resume: sent with ``on_disconnect: "continue"`` in the transport's body, the turn runs on
    when its reader stops mid-answer; a new Chat for the id (a reloaded page) calls ``resumeStream()``, the
    transport's ``reconnectToStream`` replays the turn from its start and follows it live, and the replay
    takes the place of the partial reply: the whole stored answer, once."""
    owner = Owner(f"org-{uuid.uuid4().hex[:6]}", "sdk-user")
    token = mint_token(JWT_SECRET, owner.user_id, owner.org_id)
    chat_id = chat_id_for(owner, "client-resume-1")
    process = await start_resume(node_ai, gateway_url, token, "client-resume-1", "resume",
                                 "fake/echo?tokens=300&gap_ms=20")
    stopped = await next_line(process)
    assert stopped["status"] == "ready" and stopped["stopped"].startswith("pick")
    resumed = await next_line(process)
    # The answer still runs, unread, while the resumed reader catches up with it.
    assert await db.fetchval("SELECT status FROM messages WHERE chat_id = $1 AND role = 'assistant'",
                             chat_id) == "streaming"
    result = await next_line(process)
    assert await asyncio.wait_for(process.wait(), 60) == 0
    row = await db.fetchrow("SELECT id, status, finish_reason, content FROM messages WHERE chat_id = $1 AND "
                            "role = 'assistant'", chat_id)
    assert row is not None
    assert (row["status"], row["finish_reason"]) == ("complete", "stop")
    message = result["message"]
    text = "".join(part["text"] for part in message["parts"] if part["type"] == "text")
    assert text == row["content"] and message["id"] == str(row["id"])
    assert len(stopped["stopped"]) < len(text) and text.startswith(resumed["resumed"])
    assert [m["role"] for m in result["messages"]] == ["user", "assistant"]
    assert (result["status"], result["error"]) == ("ready", None)
    assert result["finish"] == {"finishReason": "stop", "isAbort": False, "isDisconnect": False, "isError": False}
    sent, resumption = result["requests"]
    assert (sent["method"], sent["body"]["on_disconnect"]) == ("POST", "continue")
    assert (resumption["method"], resumption["status"]) == ("GET", 200)
    assert resumption["url"] == f"{gateway_url}/v1/ui/chat/client-resume-1/stream"


async def test_resume_on_mount_of_a_new_chat_finds_nothing(node_ai: Path, gateway_url: str) -> None:
    """useChat({resume: true}) mounting a chat never sent to: 204, so the SDK stays ready, no error."""
    token = mint_token(JWT_SECRET, "sdk-user", f"org-{uuid.uuid4().hex[:6]}")
    process = await start_resume(node_ai, gateway_url, token, "client-never-sent", "fresh")
    result = await next_line(process)
    assert await asyncio.wait_for(process.wait(), 60) == 0
    assert (result["status"], result["error"], result["messages"]) == ("ready", None, [])
    assert [(r["method"], r["status"]) for r in result["requests"]] == [("GET", 204)]
