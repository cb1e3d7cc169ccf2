"""/openapi.json describes every endpoint, is valid OpenAPI 3.1, and real answers match it; /docs renders it."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
from openapi_spec_validator import validate
from playwright.async_api import async_playwright, expect
from pydantic import BaseModel
from starlette.routing import Route

from gateway.api import openapi
from tests.api.test_page import CHROMIUM, CHROMIUM_FLAGS
from tests.api.test_send import SLOW, new_chat, next_delta, read_events
from tests.conftest import Gateway, auth_headers

JSON = {"Accept": "application/json"}


def held(model: type[BaseModel], response: httpx.Response, status: int = 200) -> Any:
    """The answer, after checking its status and that it is what the description says (no field more)."""
    assert response.status_code == status, response.text
    return model.model_validate(response.json())


async def test_the_description_is_public_and_valid_openapi(client: httpx.AsyncClient) -> None:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    validate(document)
    assert document["openapi"] == "3.1.0"
    assert document["paths"]["/health"]["get"]["security"] == []
    send = document["paths"]["/v1/chats/{chat_id}/messages"]["post"]
    assert send["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/SendMessage")
    attachment = document["components"]["schemas"]["Attachment"]["properties"]["media_type"]
    assert "application/pdf" in attachment["enum"]


async def test_every_endpoint_is_described(gateway: Gateway) -> None:
    served = {(method, route.path) for route in gateway.app.routes if isinstance(route, Route)
              for method in route.methods or () if method != "HEAD"}
    described = {(method.upper(), path) for path, methods in openapi.document()["paths"].items()
                 for method in methods}
    assert served == described


async def test_real_answers_match_the_description(client: httpx.AsyncClient) -> None:
    org = f"org-{uuid.uuid4().hex[:6]}"
    alice = auth_headers(f"alice-{uuid.uuid4().hex[:6]}", org)
    admin = auth_headers(f"admin-{uuid.uuid4().hex[:6]}", org, role="admin")
    held(openapi.Health, await client.get("/health"))
    held(openapi.Ready, await client.get("/ready"))
    chat = held(openapi.Chat, await client.post("/v1/chats", headers=alice, json={"title": "t"}), 201)
    turn = held(openapi.TurnAnswer, await client.post(
        f"/v1/chats/{chat.id}/messages", headers={**alice, **JSON}, json={"content": "hello there"}))
    assert turn.assistant_message.usage is not None and turn.error is None
    failed = held(openapi.TurnAnswer, await client.post(f"/v1/chats/{chat.id}/messages", headers={**alice, **JSON},
                                                        json={"content": "a b c", "model": "fake/echo?fail_after=1"}))
    assert failed.error is not None and failed.assistant_message.status == "error"
    async with client.stream("POST", f"/v1/chats/{chat.id}/messages", headers=alice,
                             json={"content": "stream it"}) as response:
        events = [event async for event in read_events(response)]
    assert {event.event for event in events} == {"start", "delta", "usage", "done"}
    for event in events:
        openapi.EVENTS[event.event].model_validate(event.json())
    read = held(openapi.ChatWithMessages, await client.get(f"/v1/chats/{chat.id}", headers=alice))
    assert read.message_count == 6
    held(openapi.MessageList, await client.get(f"/v1/chats/{chat.id}/messages?limit=2", headers=alice))
    held(openapi.ChatPage, await client.get("/v1/chats", headers=alice))
    held(openapi.Chat, await client.patch(f"/v1/chats/{chat.id}", headers=alice, json={"title": "u"}))
    held(openapi.Stats, await client.get("/v1/stats", headers=alice))
    held(openapi.UsageReport, await client.get("/v1/usage", headers=alice))
    held(openapi.Quota, await client.get(f"/v1/admin/quotas/org/{org}", headers=admin))
    held(openapi.Quota, await client.put("/v1/admin/quotas/user/u-1", headers=admin,
                                         json={"tokens_per_period": 1000}))
    held(openapi.ModelList, await client.get("/v1/models", headers=alice))
    held(openapi.Error, await client.get(f"/v1/chats/{uuid.uuid4()}", headers=alice), 404)
    held(openapi.Error, await client.post("/v1/chats", headers=alice, json={"title": 5}), 422)
    held(openapi.OpenAIError, await client.post("/v1/chat/completions", headers=alice,
                                                json={"model": "nobody/x", "messages": [{"role": "user", "content": "x"}]}),
         404)
    slow = await new_chat(client, alice, model=SLOW)
    async with client.stream("POST", f"/v1/chats/{slow}/messages", headers=alice, json={"content": "go"}) as response:
        events = read_events(response)
        await next_delta(events)
        held(openapi.Stopped, await client.post(f"/v1/chats/{slow}/stop", headers=alice))


async def test_the_docs_page_lists_every_endpoint(gateway: Gateway) -> None:
    count = sum(len(methods) for methods in openapi.document()["paths"].values())
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = await browser.new_page()
        await page.goto(f"{gateway.url}/docs")
        await expect(page.locator("#operations details")).to_have_count(count)
        await page.locator("summary", has_text="Send a message; the reply streams").click()
        await page.get_by_role("link", name="SendMessage").click()
        await expect(page.locator("#schema-SendMessage pre")).to_be_visible()
        await expect(page.locator("#schema-SendMessage pre")).to_contain_text('"attachments"')
        await browser.close()
