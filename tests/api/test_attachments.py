"""Attachments (images and PDFs) from a message to the model: checked, stored, sent with the message and
with every later turn of its chat, in each vendor's own format; and through the OpenAI-compatible surface."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from gateway.edge.auth import mint_token
from providers.base import ATTACHMENT_CHARS
from storage.db import Pool
from tests.api.test_send import new_chat
from tests.conftest import JWT_SECRET, auth_headers
from tests.providers.test_adapters import PDF, PHOTO, PNG, REPORT
from tests.streaming.test_admission import chat_rows
from tests.streaming.test_dispatch import vendor_gateway
from tests.vendors import TEXT, VENDORS, VendorServer, conversation

JSON = {"Accept": "application/json"}
LOOK = [{"name": "photo.jpg", "media_type": "image/jpeg", "url": PHOTO.url},
        {"name": "dot.png", "media_type": "image/png", "url": PNG},
        {"name": "paper.pdf", "media_type": "application/pdf", "url": PDF}]


def owner() -> dict[str, str]:
    return auth_headers(f"u-{uuid.uuid4().hex[:6]}", f"org-{uuid.uuid4().hex[:6]}")


@contextlib.asynccontextmanager
async def vendor_chat(
    start_gateway: Any, vendors: dict[str, Any], vendor: str
) -> AsyncIterator[tuple[VendorServer, httpx.AsyncClient, dict[str, str], str]]:
    """A gateway in front of the vendor fakes, a client, a new caller and a chat of theirs with ``vendor``'s
    model; with the vendor's fake, to read what reached it."""
    headers = owner()
    async with vendor_gateway(start_gateway, vendors) as gateway, httpx.AsyncClient(base_url=gateway.url) as http:
        yield vendors[vendor][0], http, headers, await new_chat(http, headers, model=f"{vendor}/normal")


@pytest.mark.parametrize("vendor", VENDORS)
async def test_attachments_are_stored_and_go_with_every_later_turn(
    start_gateway: Any, vendors: dict[str, Any], vendor: str
) -> None:
    async with vendor_chat(start_gateway, vendors, vendor) as (server, http, headers, chat_id):
        first = await http.post(f"/v1/chats/{chat_id}/messages", headers={**headers, **JSON},
                                json={"content": "what is this?", "attachments": LOOK})
        assert first.status_code == 200
        assert first.json()["user_message"]["parts"] == [
            {"type": "text", "text": "what is this?"}, *({"type": "attachment", **a} for a in LOOK)]
        files = [("image", PHOTO.url), ("image", PNG), ("pdf", PDF)]
        assert conversation(vendor, server.requests[-1]["body"]) == [("user", "what is this?", files)]
        second = await http.post(f"/v1/chats/{chat_id}/messages", headers={**headers, **JSON},
                                 json={"content": "and now?"})
        assert second.status_code == 200
    assert conversation(vendor, server.requests[-1]["body"]) == [
        ("user", "what is this?", files), ("assistant", TEXT, []), ("user", "and now?", [])]


async def test_a_link_the_vendor_cannot_take_is_refused_and_changes_nothing(
    start_gateway: Any, vendors: dict[str, Any], db: Pool
) -> None:
    async with vendor_chat(start_gateway, vendors, "openai") as (server, http, headers, chat_id):
        before, calls = await chat_rows(db, chat_id), len(server.requests)
        report = {"name": "report.pdf", "media_type": "application/pdf", "url": REPORT.url}
        refused = await http.post(f"/v1/chats/{chat_id}/messages", headers=headers,
                                  json={"content": "read it", "attachments": [LOOK[0], report]})
        assert refused.status_code == 422
        error = refused.json()["error"]
        assert error["details"][0]["loc"] == ["attachments", 1, "url"]
        assert "openai/normal" in error["message"] and "data URL" in error["message"]
        assert await chat_rows(db, chat_id) == before and len(server.requests) == calls
        # The refused turn gave its admission back: the chat takes its next turn at once.
        sent = await http.post(f"/v1/chats/{chat_id}/messages", headers={**headers, **JSON},
                               json={"content": "read it", "attachments": [LOOK[0], LOOK[2]]})
        assert sent.status_code == 200


@pytest.mark.parametrize(("attachment", "loc"), [
    ({"name": "notes.txt", "media_type": "text/plain", "url": "https://files.example/notes.txt"}, "media_type"),
    ({"name": "a.png", "media_type": "image/png", "url": "ftp://files.example/a.png"}, "url"),
    ({"name": "a.png", "media_type": "image/png", "url": PDF}, "url"),  # a data URL of another type
    ({"name": "a.png", "media_type": "image/png", "url": "data:image/png;base64,not base64!"}, "url"),
    ({"name": "", "media_type": "image/png", "url": PNG}, "name"),
])
async def test_an_attachment_that_cannot_reach_a_model_is_refused_and_changes_nothing(
    client: httpx.AsyncClient, db: Pool, attachment: dict[str, str], loc: str
) -> None:
    headers = owner()
    chat_id = await new_chat(client, headers)
    before = await chat_rows(db, chat_id)
    response = await client.post(f"/v1/chats/{chat_id}/messages", headers=headers,
                                 json={"content": "see", "attachments": [LOOK[0], attachment]})
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["loc"] == ["attachments", 1, loc]
    assert await chat_rows(db, chat_id) == before


async def test_attachments_count_in_the_prompt(client: httpx.AsyncClient) -> None:
    headers = owner()
    chat_id = await new_chat(client, headers)
    response = await client.post(f"/v1/chats/{chat_id}/messages", headers={**headers, **JSON},
                                 json={"content": "look", "attachments": LOOK[:2]})
    # The fake reports input usage as the prompt's size / 4, and an attachment counts ATTACHMENT_CHARS.
    assert response.json()["assistant_message"]["usage"]["input_tokens"] == (4 + 2 * ATTACHMENT_CHARS) // 4


async def test_an_attachment_stored_before_the_checks_is_named_in_the_text(
    start_gateway: Any, vendors: dict[str, Any], db: Pool
) -> None:
    async with vendor_chat(start_gateway, vendors, "anthropic") as (server, http, headers, chat_id):
        chat = await db.fetchrow("SELECT org_id, user_id FROM chats WHERE id = $1", uuid.UUID(chat_id))
        parts = [{"type": "text", "text": "old"},
                 {"type": "attachment", "name": "notes.txt", "media_type": "text/plain", "url": "https://x/n.txt"},
                 {"type": "attachment", "name": "photo.jpg", "media_type": "image/jpeg", "url": PHOTO.url}]
        await db.execute("INSERT INTO messages (id, chat_id, org_id, user_id, role, content, parts)"
                         " VALUES ($1, $2, $3, $4, 'user', 'old', $5)",
                         uuid.uuid4(), uuid.UUID(chat_id), chat["org_id"], chat["user_id"], parts)
        response = await http.post(f"/v1/chats/{chat_id}/messages", headers={**headers, **JSON},
                                   json={"content": "new"})
        assert response.status_code == 200
    note = "\n[attachment 'notes.txt' (text/plain) is not shown to this model]"
    assert conversation("anthropic", server.requests[-1]["body"]) == [
        ("user", "old" + note, [("image", PHOTO.url)]), ("user", "new", [])]


async def test_completions_take_images_and_pdfs(start_gateway: Any, vendors: dict[str, Any]) -> None:
    server: VendorServer = vendors["gemini"][0]
    token = mint_token(JWT_SECRET, f"u-{uuid.uuid4().hex[:6]}", f"org-{uuid.uuid4().hex[:6]}")
    async with vendor_gateway(start_gateway, vendors) as gateway, openai.AsyncOpenAI(
            base_url=f"{gateway.url}/v1", api_key=token, max_retries=0) as client:
        completion = await client.chat.completions.create(model="gemini/normal", messages=[
            {"role": "user", "content": [
                {"type": "text", "text": "compare"},
                {"type": "image_url", "image_url": {"url": "https://files.example/cat.png", "detail": "low"}},
                {"type": "image_url", "image_url": {"url": PNG}},
                {"type": "file", "file": {"filename": "paper.pdf", "file_data": PDF}}]}])
        assert completion.choices[0].message.content == TEXT
        assert server.requests[-1]["body"]["contents"][0]["parts"][0]["fileData"]["mimeType"] == "image/png"
        assert conversation("gemini", server.requests[-1]["body"]) == [
            ("user", "compare", [("image", "https://files.example/cat.png"), ("image", PNG), ("pdf", PDF)])]
        refusals: list[list[dict[str, Any]]] = [
            [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": PNG}}]}],
            [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-abc"}}]}],
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": PDF}}]}],
            [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}],
        ]
        calls = len(server.requests)
        for messages in refusals:
            with pytest.raises(openai.BadRequestError):
                await client.chat.completions.create(model="gemini/normal", messages=messages)  # type: ignore[arg-type]
        assert len(server.requests) == calls


async def test_file_parts_of_the_ui_stream_are_attachments(
    start_gateway: Any, vendors: dict[str, Any], db: Pool
) -> None:
    async with vendor_chat(start_gateway, vendors, "anthropic") as (server, http, headers, _):
        def body(chat: str, *files: dict[str, str]) -> dict[str, Any]:
            return {"id": chat, "trigger": "submit-message", "model": "anthropic/normal", "messages": [
                {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "what is it?"}, *files]}]}

        photo = {"type": "file", "mediaType": "image/jpeg", "filename": "photo.jpg", "url": PHOTO.url}
        response = await http.post("/v1/ui/chat", headers=headers, json=body("with-a-file", photo))
        assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
        assert conversation("anthropic", server.requests[-1]["body"]) == [
            ("user", "what is it?", [("image", PHOTO.url)])]
        chats = await db.fetchval("SELECT count(*) FROM chats WHERE metadata->>'client_chat_id' = 'refused-file'")
        notes = {"type": "file", "mediaType": "text/plain", "filename": "notes.txt", "url": "https://x/n.txt"}
        refused = await http.post("/v1/ui/chat", headers=headers, json=body("refused-file", photo, notes))
        assert refused.status_code == 422
        assert refused.json()["error"]["details"][0]["loc"] == ["attachments", 1, "media_type"]
        assert await db.fetchval(
            "SELECT count(*) FROM chats WHERE metadata->>'client_chat_id' = 'refused-file'") == chats == 0

