"""/metrics: streams and refusals counted, summed over every worker."""

from __future__ import annotations

import re
import uuid

import httpx

from gateway.settings import Settings
from tests.conftest import JWT_SECRET, auth_headers
from tests.servers import gateway_process


def sample(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def test_metrics_count_streams_and_refusals(client: httpx.AsyncClient, alice: dict[str, str]) -> None:
    before = (await client.get("/metrics")).text
    chat = (await client.post("/v1/chats", headers=alice, json={})).json()["id"]
    await client.post(f"/v1/chats/{chat}/messages", headers=alice, json={"content": "three small words"})
    response = await client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    after = response.text
    ended = 'streamgate_stream_endings_total{finish_reason="stop"}'
    assert sample(after, ended) - sample(before, ended) == 1
    assert sample(after, "streamgate_tokens_out_total") - sample(before, "streamgate_tokens_out_total") == 3
    assert "streamgate_time_to_first_token_seconds_bucket" in after
    assert 'streamgate_backend_call_seconds_count{backend="postgres",call="insert_turn"}' in after
    assert sample(after, "streamgate_active_streams") == 0


async def test_metrics_sum_every_worker(settings: Settings) -> None:
    assert settings.database_url and settings.redis_url
    env = {"GATEWAY_DATABASE_URL": settings.database_url, "GATEWAY_REDIS_URL": settings.redis_url,
           "GATEWAY_REDIS_PREFIX": settings.redis_prefix, "GATEWAY_JWT_SECRET": JWT_SECRET}
    headers = auth_headers(f"u-{uuid.uuid4().hex[:6]}", "org-metrics")
    async with gateway_process(env, "--workers", "2") as gateway:
        async with httpx.AsyncClient(base_url=gateway.url) as http:
            for _ in range(6):  # new connections: the kernel spreads them over both workers
                async with httpx.AsyncClient(base_url=gateway.url) as fresh:
                    await fresh.post("/v1/chat", headers=headers, json={"message": "hello"})
            text = (await http.get("/metrics")).text
    assert sample(text, 'streamgate_stream_endings_total{finish_reason="stop"}') == 6
