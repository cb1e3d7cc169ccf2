"""The ``gateway`` command as a user runs it: zero-setup serve, token, migrations racing, and what it shows
on a console (a terminal's or a pipe's)."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import signal
import sys
import uuid
from pathlib import Path

import asyncpg
import httpx
import orjson
import pytest

from gateway.settings import Settings
from storage.db import Pool
from storage.migrations import migrations_dir
from tests.conftest import database_named
from tests.servers import gateway_process

_SERVICE_VARS = ("GATEWAY_DATABASE_URL", "GATEWAY_REDIS_URL", "GATEWAY_JWT_SECRET")


async def run_cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    base = {k: v for k, v in os.environ.items() if k not in _SERVICE_VARS}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        *args,
        env={**base, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_serve_with_no_services_starts_embedded_ones(tmp_path: Path) -> None:
    env = {"GATEWAY_DATA_DIR": str(tmp_path / "data"), "GATEWAY_DATABASE_URL": "", "GATEWAY_REDIS_URL": ""}
    async with gateway_process(env) as gateway:
        async with httpx.AsyncClient(base_url=gateway.url) as http:
            assert (await http.get("/health")).status_code == 200
            assert (await http.get("/ready")).json()["checks"] == {"postgres": "ok", "redis": "ok"}
            code, token, _ = await run_cli(env, "token", "--user", "u1", "--org", "o1")
            assert code == 0
            headers = {"Authorization": f"Bearer {token.strip()}"}
            assert (await http.get("/v1/chats", headers=headers)).status_code == 200
        assert await gateway.signal(signal.SIGTERM) == 0
    log = "".join(gateway.log)
    assert "embedded PostgreSQL started" in log
    assert "embedded Redis started" in log
    assert "embedded PostgreSQL stopped" in log
    assert "embedded Redis stopped" in log


async def run_on_terminal(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """``gateway ARGS`` with its stderr on a pseudo-terminal (stdout on a pipe): its exit code, its stdout and
    what the terminal was sent."""
    base = {k: v for k, v in os.environ.items() if k not in _SERVICE_VARS}
    controller, terminal = pty.openpty()
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", *args, env={**base, **env}, stdout=asyncio.subprocess.PIPE,
            stderr=terminal)
    finally:
        os.close(terminal)  # the child holds the only copy: reads end once it exits
    try:
        shown, (out, _) = await asyncio.gather(asyncio.to_thread(read_terminal, controller), process.communicate())
    finally:
        os.close(controller)
    assert process.returncode is not None
    return process.returncode, out.decode(), shown


def read_terminal(controller: int) -> str:
    """Everything a pseudo-terminal's other end writes, until it is closed."""
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: no process holds the terminal any more
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


async def test_serve_keeps_the_embedded_servers_own_output_off_the_console(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without XDG_RUNTIME_DIR (a container, a service), pgserver's platformdirs warned on every start.
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    data = tmp_path / "data"
    env = {"GATEWAY_DATA_DIR": str(data), "GATEWAY_DATABASE_URL": "", "GATEWAY_REDIS_URL": ""}
    async with gateway_process(env) as gateway:
        async with httpx.AsyncClient(base_url=gateway.url) as http:
            assert (await http.get("/ready")).json()["checks"] == {"postgres": "ok", "redis": "ok"}
        assert await gateway.signal(signal.SIGTERM) == 0
    log = "".join(gateway.log)
    assert "embedded PostgreSQL stopped" in log
    assert all(line.startswith("{") for line in gateway.log), log  # a pipe gets JSON records, nothing else
    for noise in ("XDG_RUNTIME_DIR", "Warning", "initdb", "pg_ctl", "commandline", "pgserver"):
        assert noise not in log
    records = (tmp_path / "data" / "postgres.log").read_text()  # where pgserver's records went
    assert "initdb" in records and "pg_ctl" in records and "stop" in records


async def test_a_terminal_gets_text_lines_and_log_format_overrides_the_choice(tmp_path: Path) -> None:
    # A first `gateway token` generates the development secret and logs a warning about it.
    def fresh() -> dict[str, str]:
        return {"GATEWAY_DATA_DIR": str(tmp_path / uuid.uuid4().hex)}

    code, out, shown = await run_on_terminal(fresh(), "token", "--user", "u", "--org", "o")
    assert code == 0 and out.count(".") == 2  # stdout holds the token alone
    assert re.fullmatch(r"\d\d:\d\d:\d\d WARNING gateway\.embedded generated a development JWT secret; set "
                        r"GATEWAY_JWT_SECRET in production path=\S+/jwt_secret", shown.strip()), shown
    code, _, shown = await run_on_terminal({**fresh(), "GATEWAY_LOG_FORMAT": "json"}, "token", "--user", "u",
                                           "--org", "o")
    assert code == 0 and orjson.loads(shown)["logger"] == "gateway.embedded"
    code, _, err = await run_cli({**fresh(), "GATEWAY_LOG_FORMAT": "text"}, "token", "--user", "u", "--org", "o")
    assert code == 0 and " WARNING gateway.embedded generated a development JWT secret" in err
    code, _, err = await run_cli(fresh(), "token", "--user", "u", "--org", "o")
    assert code == 0 and orjson.loads(err)["level"] == "warning"


async def test_invalid_setting_names_the_variable(tmp_path: Path) -> None:
    code, _, err = await run_cli({"GATEWAY_CHECKPOINT_S": "soon"}, "token", "--user", "u", "--org", "o")
    assert code != 0
    assert "GATEWAY_CHECKPOINT_S" in err


async def test_two_migrators_at_once_apply_each_migration_once(settings: Settings, db: Pool) -> None:
    name = f"sg_migrate_{uuid.uuid4().hex[:8]}"
    await db.execute(f'CREATE DATABASE "{name}"')
    assert settings.database_url
    env = {"GATEWAY_DATABASE_URL": database_named(settings.database_url, name), "GATEWAY_REDIS_URL": "x"}
    try:
        results = await asyncio.gather(run_cli(env, "migrate"), run_cli(env, "migrate"))
        assert [code for code, _, _ in results] == [0, 0]
        versions_on_disk = sorted(path.stem for path in migrations_dir().glob("*.sql"))
        outputs = sorted(out for _, out, _ in results)
        assert outputs[0].startswith("applied 0 migration(s): none pending")
        assert outputs[1].startswith(f"applied {len(versions_on_disk)} migration(s): {', '.join(versions_on_disk)}")
        conn = await asyncpg.connect(env["GATEWAY_DATABASE_URL"])
        try:
            versions = await conn.fetch("SELECT version FROM schema_migrations")
        finally:
            await conn.close()
        assert sorted(row["version"] for row in versions) == versions_on_disk
    finally:
        await db.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
