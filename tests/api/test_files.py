"""Files: uploaded as a form or as the body itself, checked as they arrive, kept in PostgreSQL as their
owner's alone, and sent to each vendor in its inline form with the message that attaches them and every
later turn; the memory an upload takes, and every refusal leaving the database as it was.

Past 400 lines because each vendor's inline form and each refusal of an upload is checked.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
import re
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import async_playwright, expect

from gateway.api import openapi
from gateway.settings import Settings
from storage.db import Pool
from tests.api.test_attachments import vendor_chat
from tests.api.test_openapi import held
from tests.api.test_page import CHROMIUM, CHROMIUM_FLAGS
from tests.api.test_send import new_chat
from tests.conftest import JWT_SECRET, auth_headers
from tests.servers import gateway_process
from tests.streaming.test_admission import chat_rows
from tests.vendors import TEXT, VENDORS, conversation

MiB = 1024 * 1024
JSON = {"Accept": "application/json"}
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 24


def owner() -> dict[str, str]:
    return auth_headers(f"u-{uuid.uuid4().hex[:6]}", f"org-{uuid.uuid4().hex[:6]}")


def jpeg(size: int, seed: int = 0) -> bytes:
    """``size`` bytes that start as a JPEG does (FF D8 FF), the rest random."""
    return b"\xff\xd8\xff\xe0" + random.Random(seed).randbytes(size - 4)


def data_url(media_type: str, data: bytes) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


async def upload(http: httpx.AsyncClient, headers: dict[str, str], name: str, media_type: str, data: bytes,
                 form: bool = True) -> httpx.Response:
    """``data`` uploaded as a form's ``file`` part, or as the body itself (``form=False``)."""
    if form:
        return await http.post("/v1/files", headers=headers, files={"file": (name, data, media_type)})
    return await http.post("/v1/files", headers={**headers, "Content-Type": media_type}, content=data,
                           params={"name": name})


async def uploaded(http: httpx.AsyncClient, headers: dict[str, str], name: str, media_type: str, data: bytes,
                   form: bool = True) -> str:
    response = await upload(http, headers, name, media_type, data, form)
    return str(held(openapi.File, response, 201).id)


async def file_rows(db: Pool) -> list[Any]:
    """Every file and chunk stored (their ids and sizes), to show a refusal stored nothing."""
    files = await db.fetch("SELECT id, org_id, user_id, name, size, sha256 FROM files ORDER BY id")
    chunks = await db.fetch("SELECT file_id, seq, length(data) FROM file_chunks ORDER BY file_id, seq")
    return [*map(tuple, files), *map(tuple, chunks)]


@pytest.mark.parametrize("form", [True, False], ids=["form", "body"])
async def test_a_file_is_stored_described_and_read_back(client: httpx.AsyncClient, db: Pool, form: bool) -> None:
    # A form's file name cannot hold a quote (a browser sends it as %22): that one goes as a body's.
    headers, data = owner(), PNG + bytes(range(256)) * 5000
    name = "Café menu 1.png" if form else 'Café "menu" 1.png'
    file = held(openapi.File, await upload(client, headers, name, "image/png", data, form), 201)
    assert (file.name, file.media_type, file.size) == (name, "image/png", len(data))
    assert file.sha256 == hashlib.sha256(data).hexdigest()
    assert held(openapi.File, await client.get(f"/v1/files/{file.id}", headers=headers)) == file
    content = await client.get(f"/v1/files/{file.id}/content", headers=headers)
    assert content.status_code == 200 and content.content == data
    assert content.headers["content-type"] == "image/png"
    assert content.headers["x-content-type-options"] == "nosniff"
    fallback, encoded = ("Caf_ menu 1.png", "Caf%C3%A9%20menu%201.png") if form else (
        "Caf_ _menu_ 1.png", "Caf%C3%A9%20%22menu%22%201.png")
    assert content.headers["content-disposition"] == f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"
    # Stored in chunks of at most 1 MiB, in order.
    lengths = await db.fetch("SELECT length(data) FROM file_chunks WHERE file_id = $1 ORDER BY seq", file.id)
    assert [row[0] for row in lengths] == [MiB] * (len(data) // MiB) + [len(data) % MiB]
    assert (await client.delete(f"/v1/files/{file.id}", headers=headers)).status_code == 204
    assert (await client.get(f"/v1/files/{file.id}", headers=headers)).status_code == 404
    assert await db.fetchval("SELECT count(*) FROM file_chunks WHERE file_id = $1", file.id) == 0


async def test_a_text_file_is_served_as_utf8_text(client: httpx.AsyncClient) -> None:
    headers = owner()
    file_id = await uploaded(client, headers, "notes.txt", "text/plain; charset=utf-8", "héllo\n".encode())
    content = await client.get(f"/v1/files/{file_id}/content", headers=headers)
    assert content.headers["content-type"] == "text/plain; charset=utf-8" and content.text == "héllo\n"


async def test_the_files_are_listed_newest_first_by_offset_or_cursor(client: httpx.AsyncClient) -> None:
    headers = owner()
    ids = [await uploaded(client, headers, f"{n}.png", "image/png", PNG) for n in range(5)]
    newest_first = ids[::-1]
    first = held(openapi.FilePage, await client.get("/v1/files?limit=2", headers=headers))
    assert [str(f.id) for f in first.items] == newest_first[:2] and first.total == 5
    assert first.next_cursor is not None
    by_offset = held(openapi.FilePage, await client.get("/v1/files?limit=2&offset=2", headers=headers))
    assert [str(f.id) for f in by_offset.items] == newest_first[2:4]
    seen, cursor = [], first.next_cursor
    while cursor is not None:
        page = held(openapi.FilePage, await client.get("/v1/files", headers=headers,
                                                       params={"limit": 2, "cursor": cursor}))
        seen += [str(f.id) for f in page.items]
        cursor = page.next_cursor
    assert seen == newest_first[2:]
    bad = await client.get("/v1/files?cursor=not-a-cursor", headers=headers)
    assert bad.status_code == 422 and bad.json()["error"]["details"][0]["loc"] == ["cursor"]
    assert held(openapi.FilePage, await client.get("/v1/files", headers=owner())).items == []


@pytest.mark.parametrize("vendor", VENDORS)
async def test_a_5_mib_jpeg_reaches_each_vendor_inline_this_turn_and_the_next(
    start_gateway: Any, vendors: dict[str, Any], vendor: str
) -> None:
    form_bytes, body_bytes = jpeg(5 * MiB, 1), jpeg(5 * MiB, 2)
    async with vendor_chat(start_gateway, vendors, vendor) as (server, http, headers, chat_id):
        by_form = await uploaded(http, headers, "form.jpg", "image/jpeg", form_bytes)
        by_body = await uploaded(http, headers, "body.jpg", "image/jpeg", body_bytes, form=False)
        first = await http.post(f"/v1/chats/{chat_id}/messages", headers={**headers, **JSON}, timeout=60, json={
            "content": "what is this?", "attachments": [{"file_id": by_form}, {"file_id": by_body}]})
        turn = held(openapi.TurnAnswer, first)
        assert turn.user_message.parts == [
            {"type": "text", "text": "what is this?"},
            {"type": "attachment", "file_id": by_form, "name": "form.jpg", "media_type": "image/jpeg"},
            {"type": "attachment", "file_id": by_body, "name": "body.jpg", "media_type": "image/jpeg"}]
        files = [("image", data_url("image/jpeg", form_bytes)), ("image", data_url("image/jpeg", body_bytes))]
        assert conversation(vendor, server.requests[-1]["body"]) == [("user", "what is this?", files)]
        second = await http.post(f"/v1/chats/{chat_id}/messages", headers={**headers, **JSON}, timeout=60,
                                 json={"content": "and now?"})
        assert second.status_code == 200
        assert conversation(vendor, server.requests[-1]["body"]) == [
            ("user", "what is this?", files), ("assistant", TEXT, []), ("user", "and now?", [])]


async def test_a_text_file_reaches_the_model_as_text_and_a_deleted_file_is_named(
    start_gateway: Any, vendors: dict[str, Any]
) -> None:
    async with vendor_chat(start_gateway, vendors, "anthropic") as (server, http, headers, chat_id):
        notes = await uploaded(http, headers, "notes.txt", "text/plain", b"line one\nline two")
        photo = await uploaded(http, headers, "photo.jpg", "image/jpeg", jpeg(1000))
        sent = await http.post(f"/v1/chats/{chat_id}/messages", headers={**headers, **JSON}, json={
            "content": "read", "attachments": [{"file_id": notes}, {"file_id": photo}]})
        assert sent.status_code == 200
        text = "read\n[attachment 'notes.txt' (text/plain)]\nline one\nline two"
        assert conversation("anthropic", server.requests[-1]["body"]) == [
            ("user", text, [("image", data_url("image/jpeg", jpeg(1000)))])]
        assert (await http.delete(f"/v1/files/{photo}", headers=headers)).status_code == 204
        later = await http.post(f"/v1/chats/{chat_id}/messages", headers={**headers, **JSON}, json={"content": "and?"})
        assert later.status_code == 200
    note = "\n[attachment 'photo.jpg' (image/jpeg) is not shown to this model]"
    assert conversation("anthropic", server.requests[-1]["body"]) == [
        ("user", text + note, []), ("assistant", TEXT, []), ("user", "and?", [])]


async def test_the_files_of_one_request_stay_within_the_file_limit(start_gateway: Any, db: Pool) -> None:
    """A send whose files pass GATEWAY_MAX_FILE_BYTES together is a 413; older files past what is left
    of it are named in the text."""
    async with start_gateway(max_file_bytes=3000) as gateway, httpx.AsyncClient(base_url=gateway.url) as http:
        headers = owner()
        chat_id = await new_chat(http, headers)
        one, two = [await uploaded(http, headers, f"{n}.jpg", "image/jpeg", jpeg(2000, n)) for n in (1, 2)]
        before = await chat_rows(db, chat_id)
        both = await http.post(f"/v1/chats/{chat_id}/messages", headers=headers, json={
            "content": "both", "attachments": [{"file_id": one}, {"file_id": two}]})
        assert both.status_code == 413 and both.json()["error"]["code"] == "payload_too_large"
        assert await chat_rows(db, chat_id) == before
        first = await http.post(f"/v1/chats/{chat_id}/messages", headers={**headers, **JSON},
                                json={"content": "one", "attachments": [{"file_id": one}]})
        second = await http.post(f"/v1/chats/{chat_id}/messages", headers={**headers, **JSON},
                                 json={"content": "two", "attachments": [{"file_id": two}]})
        assert first.status_code == second.status_code == 200
        # The fake echoes the last user message; the prompt it was given shows in its input usage: the
        # first message's file left out (a note in its text) and the second's in.
        chars = len("one\n[attachment '1.jpg' (image/jpeg) is not shown to this model]") + len(
            "one") + len("two") + 6400
        assert second.json()["assistant_message"]["usage"]["input_tokens"] == chars // 4


async def another_users_file(client: httpx.AsyncClient) -> tuple[str, dict[str, str]]:
    """A file of a user, and the headers of another user of the same org."""
    org = f"org-{uuid.uuid4().hex[:6]}"
    file_id = await uploaded(client, auth_headers(f"u-{uuid.uuid4().hex[:6]}", org), "mine.png", "image/png", PNG)
    return file_id, auth_headers(f"u-{uuid.uuid4().hex[:6]}", org)


async def test_another_users_file_is_missing_in_every_route_and_in_a_send(
    client: httpx.AsyncClient, db: Pool
) -> None:
    file_id, other = await another_users_file(client)
    missing = str(uuid.uuid4())
    for target in (file_id, missing):
        answers = [await client.get(f"/v1/files/{target}", headers=other),
                   await client.get(f"/v1/files/{target}/content", headers=other),
                   await client.delete(f"/v1/files/{target}", headers=other)]
        for answer in answers:
            error = held(openapi.Error, answer, 404).error
            assert (error.code, error.message) == ("file_not_found", "File not found")
    assert (await client.get("/v1/files/not-a-uuid", headers=other)).json()["error"]["code"] == "file_not_found"
    chat_id = await new_chat(client, other)
    before, files = await chat_rows(db, chat_id), await file_rows(db)
    for target in (file_id, missing):
        sent = await client.post(f"/v1/chats/{chat_id}/messages", headers=other,
                                 json={"content": "see", "attachments": [{"file_id": target}]})
        error = held(openapi.Error, sent, 404).error
        assert error.code == "file_not_found" and error.details[0]["loc"] == ["attachments", 0, "file_id"]
    assert await chat_rows(db, chat_id) == before and await file_rows(db) == files
    assert held(openapi.FilePage, await client.get("/v1/files", headers=other)).total == 0


@pytest.mark.parametrize(("media_type", "data"), [
    ("image/png", jpeg(100)),                      # a JPEG's bytes, declared PNG
    ("image/jpeg", PNG),
    ("image/gif", b"GIF90a" + b"\x00" * 20),
    ("image/webp", b"RIFF\x00\x00\x00\x00WEBQ" + b"\x00" * 8),
    ("application/pdf", b"%PDX-1.4"),
    ("text/plain", b"caf\xe9"),                   # Latin-1, not UTF-8
    ("text/plain", b"a\x00b"),
    ("image/svg+xml", b"<svg/>"),
    ("application/octet-stream", PNG),
    ("", PNG),
])
@pytest.mark.parametrize("form", [True, False], ids=["form", "body"])
async def test_bytes_that_are_not_of_the_declared_type_are_415_and_store_nothing(
    client: httpx.AsyncClient, db: Pool, media_type: str, data: bytes, form: bool
) -> None:
    before = await file_rows(db)
    response = await upload(client, owner(), "f", media_type, data, form)
    assert held(openapi.Error, response, 415).error.code == "unsupported_media_type"
    assert await file_rows(db) == before


async def test_the_declared_type_is_checked_on_the_first_bytes(start_gateway: Any) -> None:
    """A mismatch is refused as soon as the first bytes are in: the server answers while the rest of a
    body four times the file limit has not been sent."""
    async with start_gateway(max_file_bytes=MiB) as gateway:
        status, sent = await send_until_answered(gateway.url, "image/png", jpeg(64 * 1024), None)
    assert status == 415 and sent <= 64 * 1024


async def test_an_empty_file_is_422(client: httpx.AsyncClient, db: Pool) -> None:
    before = await file_rows(db)
    for form in (True, False):
        response = await upload(client, owner(), "empty.png", "image/png", b"", form)
        assert held(openapi.Error, response, 422).error.details[0]["loc"] == ["file"]
    assert await file_rows(db) == before


def form_body(disposition: str, data: bytes, boundary: str = "b0undary") -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\nContent-Type: image/png\r\n\r\n"
            .encode() + data + f"\r\n--{boundary}--\r\n".encode())


@pytest.mark.parametrize(("how", "loc"), [
    ("?name=a%00b", ["name"]),
    ("?name=" + "n" * 256, ["name"]),
    ('form: name="file"; filename="a\x00b"', ["file", "filename"]),
    ("form: name=\"file\"; filename*=UTF-8''a%00b.png", ["file", "filename"]),
    ("form: name=\"file\"; filename*=UTF-8''%ED%A0%80.png", ["file", "filename"]),  # a lone surrogate
    ('form: name="file"; filename=""', ["file", "filename"]),
    ('form: name="other"; filename="a.png"', ["file"]),  # no part named file
])
async def test_a_name_that_cannot_be_stored_is_422_naming_its_field(
    client: httpx.AsyncClient, db: Pool, how: str, loc: list[str]
) -> None:
    before, headers = await file_rows(db), owner()
    if how.startswith("?"):
        response = await client.post(f"/v1/files{how}", headers={**headers, "Content-Type": "image/png"}, content=PNG)
    else:
        body = form_body(how.removeprefix("form: "), PNG)
        response = await client.post("/v1/files", content=body,
                                     headers={**headers, "Content-Type": "multipart/form-data; boundary=b0undary"})
    assert held(openapi.Error, response, 422).error.details[0]["loc"] == loc
    assert await file_rows(db) == before


@pytest.mark.parametrize("body", [
    b"--b0undary\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\n\x89PNG\r\n\x1a\n",  # no closing boundary
    b"no boundary at all",
    b"--b0undary\r\n" + b"X-Long: " + b"x" * 9000 + b"\r\n\r\n\r\n--b0undary--\r\n",
])
async def test_a_malformed_form_is_422(client: httpx.AsyncClient, db: Pool, body: bytes) -> None:
    before = await file_rows(db)
    response = await client.post("/v1/files", content=body,
                                 headers={**owner(), "Content-Type": "multipart/form-data; boundary=b0undary"})
    assert held(openapi.Error, response, 422).error.code == "validation_error"
    assert await file_rows(db) == before


async def test_a_form_names_its_file_and_its_type_in_its_part(client: httpx.AsyncClient) -> None:
    body = (b"preamble\r\n--xyz\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n"
            b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename*=UTF-8''r%C3%A9sum%C3%A9.pdf\r\n"
            b"Content-Type: application/pdf\r\n\r\n%PDF-1.7 --xyz\r\n--xy\r\n\r\n--xyz--\r\nepilogue")
    response = await client.post("/v1/files", content=body,
                                 headers={**owner(), "Content-Type": 'multipart/form-data; boundary="xyz"'})
    file = held(openapi.File, response, 201)
    assert (file.name, file.media_type, file.size) == ("résumé.pdf", "application/pdf", len(b"%PDF-1.7 --xyz\r\n--xy\r\n"))


async def send_until_answered(base_url: str, media_type: str, data: bytes, declared: int | None,
                              form: bool = False) -> tuple[int, int]:
    """POST ``data`` to /v1/files over a raw connection, chunked (``declared`` None) or with a
    Content-Length of ``declared``, and read the answer once ``data`` is sent, without sending more: the
    answer's status and the bytes sent. An answer that waited for the rest would never come (a timeout)."""
    url = urllib.parse.urlsplit(base_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    boundary = "fence"
    head = f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big\"\r\n" \
           f"Content-Type: {media_type}\r\n\r\n".encode()
    body = head + data if form else data
    length = f"Content-Length: {declared}" if declared is not None else "Transfer-Encoding: chunked"
    content_type = f"multipart/form-data; boundary={boundary}" if form else media_type
    token = auth_headers("u-big", "org-big")["Authorization"]
    writer.write(f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\nContent-Type: {content_type}\r\n"
                 f"{length}\r\n\r\n".encode())
    for start in range(0, len(body), 64 * 1024):
        piece = body[start:start + 64 * 1024]
        writer.write(piece if declared is not None else b"%x\r\n%s\r\n" % (len(piece), piece))
    await writer.drain()
    try:
        status_line = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
    return int(status_line.split()[1]), len(body)


@pytest.mark.parametrize("form", [True, False], ids=["form", "body"])
@pytest.mark.parametrize("declared", [True, False], ids=["length", "chunked"])
async def test_an_upload_over_the_limit_is_413_before_the_rest_is_sent(
    start_gateway: Any, db: Pool, form: bool, declared: bool
) -> None:
    """The server answers 413 once the body passes the limit (or at once, when its declared length does),
    while the client has sent a sliver of a body eight times the limit."""
    limit = 256 * 1024
    before = await file_rows(db)
    async with start_gateway(max_file_bytes=limit) as gateway:
        data = jpeg(limit + 128 * 1024)
        status, sent = await send_until_answered(gateway.url, "image/jpeg", data if not declared else b"",
                                                 8 * limit if declared else None, form)
        assert status == 413 and sent <= limit + 128 * 1024 + 200
        async with httpx.AsyncClient(base_url=gateway.url) as http:
            over = await upload(http, owner(), "over.jpg", "image/jpeg", jpeg(limit + 1), form)
            assert held(openapi.Error, over, 413).error.code == "payload_too_large"
            await uploaded(http, owner(), "limit.jpg", "image/jpeg", jpeg(limit), form)  # the limit itself is allowed
    assert len(await file_rows(db)) == len(before) + 2  # the file and its chunk, from the upload at the limit


async def test_past_the_storage_cap_an_upload_is_403_and_stores_nothing(start_gateway: Any, db: Pool) -> None:
    async with start_gateway(max_file_storage_bytes=5000) as gateway, httpx.AsyncClient(base_url=gateway.url) as http:
        headers = owner()
        await uploaded(http, headers, "a.jpg", "image/jpeg", jpeg(3000))
        before = await file_rows(db)
        refused = await upload(http, headers, "b.jpg", "image/jpeg", jpeg(2001))
        assert held(openapi.Error, refused, 403).error.code == "storage_limit_reached"
        assert await file_rows(db) == before
        await uploaded(http, owner(), "c.jpg", "image/jpeg", jpeg(4000))  # another user's cap is theirs
        await uploaded(http, headers, "d.jpg", "image/jpeg", jpeg(2000))  # up to the cap exactly


async def test_the_ui_stream_takes_an_uploaded_file_by_its_download_path(
    start_gateway: Any, vendors: dict[str, Any]
) -> None:
    async with vendor_chat(start_gateway, vendors, "openai") as (server, http, headers, _):
        photo = await uploaded(http, headers, "photo.jpg", "image/jpeg", jpeg(3000))
        part = {"type": "file", "mediaType": "image/jpeg", "url": f"/v1/files/{photo}/content"}
        response = await http.post("/v1/ui/chat", headers=headers, json={
            "id": "with-an-upload", "trigger": "submit-message", "model": "openai/normal",
            "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "what?"}, part]}]})
        assert response.status_code == 200
    assert conversation("openai", server.requests[-1]["body"]) == [
        ("user", "what?", [("image", data_url("image/jpeg", jpeg(3000)))])]


def memory_kib(pid: int, field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB$", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    assert match is not None
    return int(match.group(1))


def reset_peak(pid: int) -> int:
    """Reset the process's VmHWM to its VmRSS (clear_refs 5), and return that."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return memory_kib(pid, "VmRSS")


async def test_uploading_20_mib_costs_under_twice_the_file_in_memory(settings: Settings) -> None:
    """A gateway worker's peak resident memory (VmHWM, reset before each upload through clear_refs) while a
    20 MiB file is uploaded, as a form and as a body, stays under twice the file above its resident memory
    before the upload."""
    assert settings.database_url and settings.redis_url
    env = {"GATEWAY_DATABASE_URL": settings.database_url, "GATEWAY_REDIS_URL": settings.redis_url,
           "GATEWAY_REDIS_PREFIX": settings.redis_prefix, "GATEWAY_JWT_SECRET": JWT_SECRET}
    size, headers = 20 * MiB, owner()
    async with gateway_process(env) as gateway, httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
        pid = gateway.process.pid
        await uploaded(http, headers, "warm.jpg", "image/jpeg", jpeg(2 * MiB))  # every path of an upload run once
        await uploaded(http, headers, "warm.jpg", "image/jpeg", jpeg(2 * MiB), form=False)
        for form in (True, False):
            data = jpeg(size, int(form))
            baseline = reset_peak(pid)
            await uploaded(http, headers, "big.jpg", "image/jpeg", data, form)
            peak = memory_kib(pid, "VmHWM")
            print(f"upload as a {'form' if form else 'body'}: baseline {baseline} KiB, peak {peak} KiB, "
                  f"+{(peak - baseline) / 1024:.1f} MiB for a {size // MiB} MiB file")
            assert peak - baseline < 2 * size // 1024


async def test_the_demo_page_attaches_an_uploaded_file_to_the_next_message(
    start_gateway: Any, db: Pool, tmp_path: Path
) -> None:
    picture = tmp_path / "cat.png"
    picture.write_bytes(PNG)
    async with start_gateway(dev_mode=True) as gateway, async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = await browser.new_page()
        await page.goto(gateway.url)
        await page.get_by_role("button", name="Get a dev token").click()
        await expect(page.locator("#usage")).to_contain_text("tokens used")
        async with page.expect_file_chooser() as chooser:
            await page.get_by_role("button", name="Attach a file").click()
        await (await chooser.value).set_files(str(picture))
        await expect(page.locator("#attached-name")).to_have_text("📎 cat.png")
        await page.get_by_label("Message").fill("what is in this picture?")
        await page.get_by_role("button", name="Send").click()
        await expect(page.locator("#messages li.assistant").last).to_have_attribute("data-finish-reason", "stop")
        await expect(page.locator("#messages li.user .meta").last).to_have_text("📎 cat.png")
        await expect(page.locator("#attached")).to_be_hidden()
        message_id = await page.locator("#messages li.assistant").last.get_attribute("data-id")
        await browser.close()
    parts = await db.fetchval("SELECT u.parts FROM messages a JOIN messages u ON u.chat_id = a.chat_id"
                              " AND u.role = 'user' WHERE a.id = $1", uuid.UUID(message_id or ""))
    assert parts[1]["name"] == "cat.png" and parts[1]["media_type"] == "image/png"
    stored = await db.fetchval("SELECT string_agg(data, ''::bytea ORDER BY seq) FROM file_chunks"
                               " WHERE file_id = $1", uuid.UUID(parts[1]["file_id"]))
    assert stored == PNG
