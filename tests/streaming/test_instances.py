"""Several gateway processes on one PostgreSQL and Redis: stop from anywhere, shutdown and crash recovery."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest

from gateway.settings import Settings
from storage.db import Pool
from tests.api.test_send import SLOW, eventually, next_delta, read_events, reply_row
from tests.conftest import JWT_SECRET, auth_headers
from tests.servers import gateway_process


@pytest.fixture
def env(settings: Settings) -> dict[str, str]:
    assert settings.database_url and settings.redis_url
    return {
        "GATEWAY_DATABASE_URL": settings.database_url,
        "GATEWAY_REDIS_URL": settings.redis_url,
        "GATEWAY_REDIS_PREFIX": settings.redis_prefix,
        "GATEWAY_JWT_SECRET": JWT_SECRET,
        "GATEWAY_CHECKPOINT_S": "0.1",
    }


@pytest.fixture
async def user() -> AsyncIterator[dict[str, str]]:
    yield auth_headers(f"u-{uuid.uuid4().hex[:8]}", "org-instances")


async def create_chat(url: str, headers: dict[str, str], model: str = SLOW) -> str:
    async with httpx.AsyncClient(base_url=url) as http:
        response = await http.post("/v1/chats", headers=headers, json={"model": model})
        return str(response.json()["id"])


async def test_stop_on_another_instance_cancels_the_stream(
    env: dict[str, str], user: dict[str, str], db: Pool
) -> None:
    async with gateway_process(env) as a, gateway_process(env) as b:
        chat_id = await create_chat(a.url, user)
        async with (
            httpx.AsyncClient(base_url=a.url, timeout=30) as client_a,
            httpx.AsyncClient(base_url=b.url) as client_b,
        ):
            async with client_a.stream(
                "POST", f"/v1/chats/{chat_id}/messages", headers=user, json={"content": "stop me please"}
            ) as response:
                events = read_events(response)
                start = await anext(events)
                await next_delta(events)
                stop = await client_b.post(f"/v1/chats/{chat_id}/stop", headers=user)
                assert stop.status_code == 200 and stop.json() == {"stopped": True}
                rest = [event async for event in events]
    assert rest[-1].event == "done"
    assert rest[-1].json()["finish_reason"] == "cancelled"
    row = await reply_row(db, start.json()["assistant_message_id"])
    assert (row["status"], row["finish_reason"]) == ("cancelled", "cancelled")
    streamed = "".join(e.json()["text"] for e in rest if e.event == "delta")
    assert row["content"].endswith(streamed) and len(row["content"]) < len("stop me please ") * 100


async def test_sigterm_lets_short_streams_finish_and_stores_long_ones_as_interrupted(
    env: dict[str, str], user: dict[str, str], db: Pool
) -> None:
    async with gateway_process({**env, "GATEWAY_SHUTDOWN_GRACE_S": "1.5"}) as gateway:
        long_chat = await create_chat(gateway.url, user)
        short_chat = await create_chat(gateway.url, user, "fake/echo?tokens=20&gap_ms=25")
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            async with (
                http.stream(
                    "POST", f"/v1/chats/{long_chat}/messages", headers=user, json={"content": "long answer"}
                ) as long_response,
                http.stream(
                    "POST", f"/v1/chats/{short_chat}/messages", headers=user, json={"content": "short answer"}
                ) as short_response,
            ):
                long_events, short_events = read_events(long_response), read_events(short_response)
                long_start, short_start = await anext(long_events), await anext(short_events)
                await next_delta(long_events)
                gateway.process.send_signal(signal.SIGTERM)
                short_rest = [event async for event in short_events]
                with pytest.raises(httpx.HTTPError):  # the server gives up on it: the body ends short
                    async for _ in long_events:
                        pass
        assert await gateway.process.wait() == 0
    assert short_rest[-1].event == "done" and short_rest[-1].json()["finish_reason"] == "stop"
    short_row = await reply_row(db, short_start.json()["assistant_message_id"])
    assert short_row["status"] == "complete"
    long_row = await reply_row(db, long_start.json()["assistant_message_id"])
    assert (long_row["status"], long_row["finish_reason"]) == ("interrupted", "interrupted")
    assert long_row["content"].startswith("long answer ")


async def test_sigkill_then_restart_marks_the_reply_interrupted_and_frees_the_chat(
    env: dict[str, str], user: dict[str, str], db: Pool
) -> None:
    crash_env = {**env, "GATEWAY_INSTANCE_ID": f"node-{uuid.uuid4().hex[:6]}"}
    async with gateway_process(crash_env) as gateway:
        chat_id = await create_chat(gateway.url, user)
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            async with http.stream(
                "POST", f"/v1/chats/{chat_id}/messages", headers=user, json={"content": "crash during this"}
            ) as response:
                events = read_events(response)
                message_id = (await anext(events)).json()["assistant_message_id"]
                await next_delta(events)

                async def checkpointed() -> bool:
                    return bool((await reply_row(db, message_id))["content"])

                await eventually(checkpointed)
                assert await gateway.signal(signal.SIGKILL) == -signal.SIGKILL
    checkpoint = (await reply_row(db, message_id))["content"]
    assert (await reply_row(db, message_id))["status"] == "streaming"
    async with gateway_process(crash_env) as restarted:
        row = await reply_row(db, message_id)
        assert (row["status"], row["finish_reason"]) == ("interrupted", "interrupted")
        # What the kept events hold, at least the last checkpoint's text (tokens may have reached Redis since).
        assert row["content"].startswith(checkpoint) and checkpoint.startswith("crash ")
        async with httpx.AsyncClient(base_url=restarted.url) as http:
            again = await http.post(
                f"/v1/chats/{chat_id}/messages",
                headers={**user, "Accept": "application/json"},
                json={"content": "after the crash", "model": "fake/echo"},
            )
    assert again.status_code == 200
    assert again.json()["assistant_message"]["content"] == "after the crash"


def workers_serving(log: list[str]) -> dict[int, str]:
    """The instance id each worker process logged when it began to serve, by its pid."""
    lines = [orjson.loads(line) for line in log if '"worker serving"' in line]
    return {line["pid"]: line["instance_id"] for line in lines}


async def test_the_workers_of_one_serve_have_ids_of_their_own_and_a_restarted_one_takes_its_predecessors(
    env: dict[str, str], tmp_path: Path
) -> None:
    node = f"node-{uuid.uuid4().hex[:6]}"
    served = {**env, "GATEWAY_INSTANCE_ID": node, "GATEWAY_DATA_DIR": str(tmp_path)}
    async with gateway_process(served, "--workers", "2") as gateway:
        serving = workers_serving(gateway.log)
        assert sorted(serving.values()) == [f"{node}.0", f"{node}.1"]
        pid, its_id = next(iter(serving.items()))
        os.kill(pid, signal.SIGKILL)  # uvicorn starts another worker in its place
        await gateway.wait_for_line('"worker serving"', timeout=60, count=3)
        restarted = [i for p, i in workers_serving(gateway.log).items() if p not in serving]
        assert restarted == [its_id]  # the streams left under the dead worker's id are the new one's to reclaim
