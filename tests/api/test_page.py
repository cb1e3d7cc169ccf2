"""The demo page: served, dev tokens only in dev mode, and driven in a real headless Chromium."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from playwright.async_api import Page, Response, Route, async_playwright, expect

from storage.db import Pool
from tests.api.test_send import eventually

ARTIFACTS = Path(__file__).parent.parent / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


async def test_page_and_assets_are_public(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<main class="chat"' in page.text and "/static/app.js" in page.text
    script = await client.get("/static/app.js")
    assert script.status_code == 200 and "readStream" in script.text


async def test_dev_token_exists_only_in_dev_mode(client: httpx.AsyncClient, start_gateway: Any) -> None:
    assert (await client.post("/dev/token")).status_code == 404
    async with start_gateway(dev_mode=True) as dev, httpx.AsyncClient(base_url=dev.url) as http:
        token = (await http.post("/dev/token")).json()["token"]
        assert (await http.get("/v1/chats", headers={"Authorization": f"Bearer {token}"})).status_code == 200


async def test_chat_in_a_real_browser(start_gateway: Any, db: Pool) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    async with start_gateway(dev_mode=True) as gateway, async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = await browser.new_page(viewport={"width": 390, "height": 844})  # a phone
        await page.goto(gateway.url)
        await page.get_by_role("button", name="Get a dev token").click()
        await expect(page.locator("#usage")).to_contain_text("tokens used")

        # A reply that streams: its text grows while it arrives.
        await page.get_by_label("Model").fill("fake/echo?tokens=30&gap_ms=40")
        await page.get_by_label("Message").fill("watch these words arrive one by one")
        await page.get_by_role("button", name="Send").click()
        reply = page.locator("#messages li.assistant .text").last
        await expect(reply).not_to_have_text("")
        early = await reply.inner_text()
        await expect(page.locator("#messages li.assistant").last).to_have_attribute("data-finish-reason", "stop",
                                                                                    timeout=15000)
        final = await reply.inner_text()
        assert len(early) < len(final) and final.startswith("watch these words")

        # A slow reply, stopped halfway: the stored reply is cancelled with what had arrived.
        await page.get_by_label("Model").fill("fake/echo?tokens=400&gap_ms=50")
        await page.get_by_label("Message").fill("a long and slow answer please")
        await page.get_by_role("button", name="Send").click()
        await expect(page.locator("#messages li.assistant")).to_have_count(2)
        slow = page.locator("#messages li.assistant").nth(1)
        await expect(slow.locator(".text")).not_to_have_text("")
        message_id = uuid.UUID(await slow.get_attribute("data-id") or "")
        await page.get_by_role("button", name="Stop").click()
        await expect(slow).to_have_attribute("data-finish-reason", "cancelled", timeout=10000)
        await expect(page.locator("#status")).to_have_text("Stopped.")
        await page.screenshot(path=str(ARTIFACTS / "chat-page.png"), full_page=True)
        shown = await slow.locator(".text").inner_text()
        await browser.close()
    row = await db.fetchrow("SELECT status, finish_reason, content FROM messages WHERE id = $1", message_id)
    assert row is not None
    assert (row["status"], row["finish_reason"]) == ("cancelled", "cancelled")
    assert row["content"] == shown and 0 < len(row["content"]) < len("a long and slow answer please ") * 60


async def test_page_explains_a_bad_token(start_gateway: Any) -> None:
    async with start_gateway() as gateway, async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = await browser.new_page()
        await page.goto(gateway.url)
        await page.get_by_role("textbox", name="Token").fill("not-a-token")
        await page.get_by_role("button", name="Use").click()
        await expect(page.locator("#status")).to_contain_text("token is missing, invalid or expired")
        await browser.close()


async def test_reasoning_and_a_tool_card_in_a_real_browser(start_gateway: Any, db: Pool) -> None:
    """A reply that reasons and calls the demo tool: its reasoning folded under it, the call as a card,
    the result typed into the card sent back, and the next step's answer streamed below."""
    ARTIFACTS.mkdir(exist_ok=True)
    async with start_gateway(dev_mode=True) as gateway, async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = await browser.new_page(viewport={"width": 900, "height": 900})
        await page.goto(gateway.url)
        await page.get_by_role("button", name="Get a dev token").click()
        await expect(page.locator("#usage")).to_contain_text("tokens used")
        await page.get_by_label("Model").fill("fake/think?gap_ms=20")
        await page.get_by_label("Reasoning").select_option("low")
        await page.get_by_label("Tool").select_option("required")
        await page.get_by_label("Message").fill("weather in Paris please")
        await page.get_by_role("button", name="Send").click()
        first = page.locator("#messages li.assistant").first
        await expect(first).to_have_attribute("data-finish-reason", "tool_calls", timeout=15000)
        card = first.locator(".tool-card")
        await expect(card).to_contain_text("get_weather")
        await first.locator(".reasoning summary").click()
        await expect(first.locator(".reasoning .thought")).to_have_text("Thinking about: weather in Paris please")
        await card.get_by_label("Tool result").fill('{"celsius": 18}')
        await card.get_by_role("button", name="Send result").click()
        answer = page.locator("#messages li.assistant").nth(1)
        await expect(answer).to_have_attribute("data-finish-reason", "stop", timeout=15000)
        await expect(answer.locator(".text")).to_have_text("weather in Paris please")
        await expect(card.locator(".result")).to_have_text('→ {"celsius":18}')
        await page.screenshot(path=str(ARTIFACTS / "agent-turn.png"), full_page=True)
        call_id = await card.get_attribute("data-call-id")
        await browser.close()
    stored = await db.fetchrow("SELECT parts FROM messages WHERE role = 'tool' AND parts @> $1::jsonb",
                               [{"tool_call_id": call_id}])
    assert stored is not None and stored["parts"][0]["output"] == {"celsius": 18}


async def open_with_a_dev_token(page: Page, url: str) -> None:
    await page.goto(url)
    await page.get_by_role("button", name="Get a dev token").click()
    await expect(page.locator("#usage")).to_contain_text("tokens used")


async def send_a_slow_message(page: Page, content: str) -> dict[str, Any]:
    """Send ``content`` for a slow answer and wait for its first words; the body the page posted."""
    await page.get_by_label("Model").fill("fake/echo?tokens=200&gap_ms=20")
    await page.get_by_label("Message").fill(content)
    async with page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/v1/chat")) as posted:
        await page.get_by_role("button", name="Send").click()
    await expect(page.locator("#messages li.assistant .text")).not_to_have_text("")
    body = (await posted.value).post_data_json
    assert isinstance(body, dict)
    return body


def is_resume(response: Response) -> bool:
    return response.request.method == "GET" and "/stream" in response.url


async def test_a_reload_mid_answer_keeps_the_answer_coming(start_gateway: Any, db: Pool) -> None:
    """Sent with ``on_disconnect: "continue"``, the answer outlives the page: reloaded mid-answer, the page
    opens its chat again, shows the reply as stored so far, and follows the answer from its start (no event
    id held) into that item, its partial text replaced rather than shown twice, until it finishes."""
    async with start_gateway(dev_mode=True) as gateway, async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = await browser.new_page()
        await open_with_a_dev_token(page, gateway.url)
        body = await send_a_slow_message(page, "keep talking while I reload the page")
        assert body["on_disconnect"] == "continue"
        reply = page.locator("#messages li.assistant")
        message_id = uuid.UUID(await reply.get_attribute("data-id") or "")

        async def checkpointed() -> bool:  # some of the answer stored, for the reloaded page to show
            return bool(await db.fetchval("SELECT content FROM messages WHERE id = $1", message_id))

        await eventually(checkpointed)
        held = asyncio.Event()

        async def hold(route: Route) -> None:
            await held.wait()
            await route.continue_()

        await page.route("**/v1/chats/*/stream*", hold)  # the resume waits until the stored reply is seen
        async with page.expect_response(is_resume) as resumed:
            await page.reload()
            await expect(reply.locator(".meta")).to_have_text("streaming")
            partial = await reply.locator(".text").inner_text()
            assert partial.startswith("keep talking")
            held.set()
        response = await resumed.value
        assert response.status == 200 and "last-event-id" not in response.request.headers
        assert f"message_id={message_id}" in response.url
        # The answer was still running when the page came back for it.
        assert await db.fetchval("SELECT status FROM messages WHERE id = $1", message_id) == "streaming"
        await expect(reply).to_have_attribute("data-finish-reason", "stop", timeout=20000)
        await expect(reply).to_have_count(1)
        await expect(page.locator("#messages li.user")).to_have_count(1)
        shown = await reply.locator(".text").inner_text()
        await page.screenshot(path=str(ARTIFACTS / "resumed-after-reload.png"), full_page=True)
        await browser.close()
    row = await db.fetchrow("SELECT status, finish_reason, content FROM messages WHERE id = $1", message_id)
    assert row is not None
    assert (row["status"], row["finish_reason"]) == ("complete", "stop")
    assert row["content"] == shown and len(partial) < len(shown)


class Relay:
    """A TCP relay on 127.0.0.1 to a server's port; ``cut()`` drops every connection it carries at once, as a
    failing network does, while new ones still go through."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.writers: set[asyncio.StreamWriter] = set()

    async def carry(self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        upstream, to_upstream = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers |= {to_client, to_upstream}
        await asyncio.gather(pipe(client, to_upstream), pipe(upstream, to_client))

    def cut(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.transport.abort()


@contextlib.asynccontextmanager
async def relay_to(url: str) -> AsyncIterator[tuple[str, Relay]]:
    relay = Relay(urllib.parse.urlsplit(url).port or 80)
    server = await asyncio.start_server(relay.carry, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", relay
    finally:
        server.close()
        relay.cut()
        await server.wait_closed()


async def test_a_dropped_connection_resumes_after_the_last_event_read(start_gateway: Any, db: Pool) -> None:
    """The network drops mid-answer: the page asks for the events after the last one it read
    (``Last-Event-ID``) and the answer goes on in the same item to its end, nothing shown twice."""
    async with (start_gateway(dev_mode=True) as gateway, relay_to(gateway.url) as (url, relay),
                async_playwright() as playwright):
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = await browser.new_page()
        await open_with_a_dev_token(page, url)
        await send_a_slow_message(page, "carry on when the network is back")
        reply = page.locator("#messages li.assistant")
        message_id = uuid.UUID(await reply.get_attribute("data-id") or "")
        async with page.expect_response(is_resume) as resumed:
            relay.cut()
        response = await resumed.value
        assert response.status == 200 and int(response.request.headers["last-event-id"]) > 1
        assert await db.fetchval("SELECT status FROM messages WHERE id = $1", message_id) == "streaming"
        await expect(reply).to_have_attribute("data-finish-reason", "stop", timeout=20000)
        await expect(reply).to_have_count(1)
        shown = await reply.locator(".text").inner_text()
        await browser.close()
    row = await db.fetchrow("SELECT status, finish_reason, content FROM messages WHERE id = $1", message_id)
    assert row is not None
    assert (row["status"], row["finish_reason"]) == ("complete", "stop")
    assert row["content"] == shown and shown.startswith("carry on when the network is back")
