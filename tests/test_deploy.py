"""The production shape's load balancer: Debian's nginx with deploy/nginx.conf in front of two gateway
processes on one PostgreSQL and Redis. Events leave through it as they are written, any instance behind it
serves any request of a chat, and a turn is resumed through it on the instance that did not run it."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import httpx_sse

from gateway.settings import Settings
from storage.db import Pool
from tests.api.test_send import SLOW, eventually, next_delta, read_events, reply_row
from tests.conftest import JWT_SECRET, auth_headers
from tests.servers import GatewayProcess, free_port, gateway_process

# Paced so that a turn still runs when it is resumed: 150 deltas, 20 ms apart.
PACED = "fake/echo?tokens=150&gap_ms=20"
DEPLOY_CONF = Path(__file__).resolve().parents[1] / "deploy" / "nginx.conf"


def nginx_binary() -> str:
    """Debian's nginx (``make test-deps`` installs it); a test that needs it fails loudly without it."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    assert found, "nginx is not installed: run `make test-deps` (Debian's nginx package)"
    return found


def balancer_conf(folder: Path, port: int, upstreams: list[str]) -> Path:
    """deploy/nginx.conf with its replicas and port made local, inside the main context nginx needs."""
    site = DEPLOY_CONF.read_text()
    servers = "".join(f"    server {upstream};\n" for upstream in upstreams)
    site, replaced = re.subn(r"(?:    server gateway-\d+:8000;\n)+", servers, site)
    assert replaced == 1, "deploy/nginx.conf no longer names its replicas as the test expects"
    site = site.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    conf = folder / "nginx.conf"
    conf.write_text(
        f"worker_processes 1;\npid {folder}/nginx.pid;\nerror_log {folder}/error.log warn;\nevents {{ worker_connections 1024; }}\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {folder};\n  proxy_temp_path {folder};\n{site}}}\n")
    return conf


@contextlib.asynccontextmanager
async def balancer(folder: Path, upstreams: list[str]) -> AsyncIterator[str]:
    """nginx in the foreground on a free port in front of ``upstreams``; yields its URL once it answers."""
    port = free_port()
    conf = balancer_conf(folder, port, upstreams)
    process = await asyncio.create_subprocess_exec(
        nginx_binary(), "-c", str(conf), "-p", str(folder), "-g", "daemon off;",
        stderr=asyncio.subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url) as http:
            for _ in range(200):  # until nginx accepts: it has no readiness signal to wait on
                if process.returncode is not None:
                    assert process.stderr is not None
                    raise AssertionError(f"nginx stopped: {(await process.stderr.read()).decode()}")
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/health")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("nginx did not answer")
        yield url
    finally:
        if process.returncode is None:
            process.terminate()
            await process.wait()


def instance_env(settings: Settings, name: str) -> dict[str, str]:
    assert settings.database_url and settings.redis_url
    return {"GATEWAY_DATABASE_URL": settings.database_url, "GATEWAY_REDIS_URL": settings.redis_url,
            "GATEWAY_REDIS_PREFIX": settings.redis_prefix, "GATEWAY_JWT_SECRET": JWT_SECRET,
            "GATEWAY_INSTANCE_ID": name, "GATEWAY_CHECKPOINT_S": "0.1"}


@contextlib.asynccontextmanager
async def deployment(
    settings: Settings, folder: Path, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[GatewayProcess, GatewayProcess, httpx.AsyncClient]]:
    """Two gateway processes (``env`` added to each) behind nginx; yields them and a client of nginx."""
    extra = env or {}
    async with gateway_process({**instance_env(settings, f"lb-a-{uuid.uuid4().hex[:6]}"), **extra}) as a, \
            gateway_process({**instance_env(settings, f"lb-b-{uuid.uuid4().hex[:6]}"), **extra}) as b, \
            balancer(folder, [a.url.removeprefix("http://"), b.url.removeprefix("http://")]) as url, \
            httpx.AsyncClient(base_url=url, timeout=30) as http:
        yield a, b, http


async def test_events_pass_the_balancer_as_they_are_written_and_any_instance_stops_them(
    settings: Settings, db: Pool, tmp_path: Path
) -> None:
    user = auth_headers(f"u-{uuid.uuid4().hex[:8]}", "org-deploy")
    async with deployment(settings, tmp_path) as (_, _, http):
        chat_id = (await http.post("/v1/chats", headers=user, json={"model": SLOW})).json()["id"]
        async with http.stream("POST", f"/v1/chats/{chat_id}/messages", headers=user,
                               json={"content": "through the balancer"}) as response:
            events = read_events(response)
            start = (await anext(events)).json()
            await next_delta(events)
            # Read while the reply still streams: nothing was held back to fill a buffer.
            assert (await reply_row(db, start["assistant_message_id"]))["status"] == "streaming"
            stop = await http.post(f"/v1/chats/{chat_id}/stop", headers=user)  # whichever instance it reaches
            rest = [event async for event in events]
    assert stop.status_code == 200
    assert rest[-1].event == "done" and rest[-1].json()["finish_reason"] == "cancelled"


async def served_by(request_id: str, instances: tuple[GatewayProcess, ...]) -> GatewayProcess:
    """The instance that served the request nginx numbered ``request_id`` (it comes back as ``x-request-id``):
    the one whose access log names it. A request's line is written once its response has ended."""

    def holders() -> list[GatewayProcess]:
        return [instance for instance in instances if any(request_id in line for line in instance.log)]

    async def logged() -> bool:
        return bool(holders())

    await eventually(logged)
    found = holders()
    assert len(found) == 1, f"request {request_id} logged by {len(found)} instances"
    return found[0]


async def next_picks(http: httpx.AsyncClient, a: GatewayProcess, b: GatewayProcess) -> tuple[GatewayProcess, GatewayProcess]:
    """The instances nginx gives its next request and the one after: round robin over two equal replicas in
    one worker alternates, so a probe that lands on one means the next request lands on the other."""
    probe = await http.get("/health")
    assert probe.status_code == 200
    last = await served_by(probe.headers["x-request-id"], (a, b))
    return (b, a) if last is a else (a, b)


def delta_text(events: list[httpx_sse.ServerSentEvent]) -> str:
    return "".join(event.json()["text"] for event in events if event.event == "delta")


def ids_of(events: list[httpx_sse.ServerSentEvent]) -> list[int]:
    return [int(event.id) for event in events]


async def test_a_continue_turn_whose_sender_left_is_resumed_through_the_balancer_on_the_other_instance(
    settings: Settings, db: Pool, tmp_path: Path
) -> None:
    user = auth_headers(f"u-{uuid.uuid4().hex[:8]}", "org-deploy")
    async with deployment(settings, tmp_path) as (a, b, http):
        chat_id = (await http.post("/v1/chats", headers=user, json={"model": PACED})).json()["id"]
        runner, other = await next_picks(http, a, b)
        first: list[httpx_sse.ServerSentEvent] = []
        async with http.stream("POST", f"/v1/chats/{chat_id}/messages", headers=user,
                               json={"content": "resume me elsewhere", "on_disconnect": "continue"}) as response:
            assert response.status_code == 200
            send_id = response.headers["x-request-id"]
            async for event in read_events(response):
                first.append(event)
                if sum(e.event == "delta" for e in first) == 5:
                    break
        # The sender hung up after 5 deltas; its turn runs on, and the next request goes to the other instance.
        message_id = first[0].json()["assistant_message_id"]
        async with http.stream("GET", f"/v1/chats/{chat_id}/stream",
                               headers={**user, "Last-Event-ID": first[-1].id}) as resumed:
            assert resumed.status_code == 200
            resume_id = resumed.headers["x-request-id"]
            following = read_events(resumed)
            rest = [await anext(following)]
            assert (await reply_row(db, message_id))["status"] == "streaming"  # followed live, not replayed after
            rest += [event async for event in following]
        assert (await served_by(resume_id, (a, b))).url == other.url
        assert (await served_by(send_id, (a, b))).url == runner.url  # its line is written when its turn has ended
    events = first + rest
    assert ids_of(events) == list(range(1, len(events) + 1))
    assert events[-1].event == "done" and events[-1].json()["finish_reason"] == "stop"
    assert [e.event for e in events].count("delta") == 150
    row = await reply_row(db, message_id)
    assert row["status"] == "complete" and row["content"] == delta_text(events)
    assert delta_text(events).split() == ["resume", "me", "elsewhere"] * 50


async def test_sigkill_of_the_turns_instance_interrupts_its_resumer_on_the_other_within_the_lease(
    settings: Settings, db: Pool, tmp_path: Path
) -> None:
    lease_s = 3.0
    user = auth_headers(f"u-{uuid.uuid4().hex[:8]}", "org-deploy")
    async with deployment(settings, tmp_path, {"GATEWAY_STREAM_LEASE_S": str(lease_s)}) as (a, b, http):
        chat_id = (await http.post("/v1/chats", headers=user, json={"model": SLOW})).json()["id"]
        runner, other = await next_picks(http, a, b)
        async with http.stream("POST", f"/v1/chats/{chat_id}/messages", headers=user,
                               json={"content": "killed mid way", "on_disconnect": "continue"}) as response:
            assert response.status_code == 200
            sent = read_events(response)
            message_id = (await anext(sent)).json()["assistant_message_id"]
            await next_delta(sent)
        seen: list[httpx_sse.ServerSentEvent] = []
        async with http.stream("GET", f"/v1/chats/{chat_id}/stream", headers=user) as resumed:
            assert resumed.status_code == 200
            resume_id = resumed.headers["x-request-id"]
            following = read_events(resumed)
            async for event in following:
                seen.append(event)
                if sum(e.event == "delta" for e in seen) == 20:
                    break
            killed_at = time.monotonic()
            assert await runner.signal(signal.SIGKILL) == -signal.SIGKILL
            seen += [event async for event in following]
            waited = time.monotonic() - killed_at
        assert seen[-1].event == "error" and seen[-1].json()["code"] == "interrupted"
        assert waited <= lease_s, f"the resumer heard of the kill {waited:.2f} s after it"
        assert ids_of(seen) == list(range(1, len(seen) + 1))
        received = delta_text(seen)
        assert received.startswith("killed mid way ") and len(received.split()) < 400
        assert (await served_by(resume_id, (a, b))).url == other.url

        async def stored_interrupted() -> bool:
            return bool((await reply_row(db, message_id))["status"] == "interrupted")

        await eventually(stored_interrupted)  # by the surviving instance's recovery sweep
    row = await reply_row(db, message_id)
    assert row["finish_reason"] == "interrupted" and row["content"].startswith(received)
