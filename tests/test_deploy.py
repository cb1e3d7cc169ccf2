"""The production shape's load balancer: Debian's nginx with deploy/nginx.conf in front of two gateway
processes on one PostgreSQL and Redis. Events leave through it as they are written, and any instance
behind it serves any request of a chat."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from gateway.settings import Settings
from storage.db import Pool
from tests.api.test_send import SLOW, next_delta, read_events, reply_row
from tests.conftest import JWT_SECRET, auth_headers
from tests.servers import free_port, gateway_process

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
        f"pid {folder}/nginx.pid;\nerror_log {folder}/error.log warn;\nevents {{ worker_connections 1024; }}\n"
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


async def test_events_pass_the_balancer_as_they_are_written_and_any_instance_stops_them(
    settings: Settings, db: Pool, tmp_path: Path
) -> None:
    user = auth_headers(f"u-{uuid.uuid4().hex[:8]}", "org-deploy")
    async with gateway_process(instance_env(settings, f"lb-a-{uuid.uuid4().hex[:6]}")) as a, \
            gateway_process(instance_env(settings, f"lb-b-{uuid.uuid4().hex[:6]}")) as b, \
            balancer(tmp_path, [a.url.removeprefix("http://"), b.url.removeprefix("http://")]) as url, \
            httpx.AsyncClient(base_url=url, timeout=30) as http:
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
