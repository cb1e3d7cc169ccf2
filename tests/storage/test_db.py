"""The connection pool (storage/db.py) on the run's PostgreSQL: what comes back to it, what it closes, and
who waits when every connection is in use. A query is held where wanted by an advisory lock another
connection owns; the test waits until PostgreSQL shows it waiting on that lock."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from gateway.edge.errors import NotFound
from storage.db import Pool, create_pool


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[Pool]:
    pool = await create_pool(database_url, 1, 2)
    yield pool
    await pool.close()


@contextlib.asynccontextmanager
async def lock_held(database_url: str) -> AsyncIterator[tuple[asyncpg.Connection, int]]:
    """An advisory lock taken on a connection outside the pool, and that connection."""
    key = uuid.uuid4().int % 2**62
    owner = await asyncpg.connect(database_url)
    try:
        await owner.execute("SELECT pg_advisory_lock($1)", key)
        yield owner, key
    finally:
        await owner.close()


async def until_waiting(watcher: asyncpg.Connection, key: int, count: int = 1) -> None:
    """Until ``count`` sessions wait for the advisory lock ``key`` (each check is a round trip)."""
    query = ("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
             " AND (classid::bigint << 32 | objid::bigint) = $1")
    while await watcher.fetchval(query, key) < count:
        pass


async def backend_pids(pool: Pool, count: int) -> set[int]:
    """The server processes behind ``count`` connections taken from the pool at once."""
    async with contextlib.AsyncExitStack() as stack:
        connections = [await stack.enter_async_context(pool.acquire()) for _ in range(count)]
        return {conn.get_server_pid() for conn in connections}


async def test_a_postgres_error_leaves_the_connection_in_the_pool(pool: Pool) -> None:
    before = await pool.fetchval("SELECT pg_backend_pid()")
    with pytest.raises(asyncpg.DivisionByZeroError):
        await pool.fetchval("SELECT 1 / 0")
    assert await pool.fetchval("SELECT pg_backend_pid()") == before
    assert pool.in_use == 0


async def test_an_error_of_ours_in_a_transaction_rolls_back_and_keeps_the_connection(pool: Pool) -> None:
    table = f"pool_test_{uuid.uuid4().hex[:8]}"
    await pool.execute(f"CREATE TABLE {table} (x int)")
    try:
        before = await pool.fetchval("SELECT pg_backend_pid()")
        with pytest.raises(NotFound):
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(f"INSERT INTO {table} VALUES (1)")
                raise NotFound()
        assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 0
        assert await pool.fetchval("SELECT pg_backend_pid()") == before
    finally:
        await pool.execute(f"DROP TABLE {table}")


async def test_a_query_cancelled_midway_closes_its_connection(pool: Pool, database_url: str) -> None:
    async with lock_held(database_url) as (owner, key):
        held = asyncio.ensure_future(pool.fetchval("SELECT 1 FROM pg_advisory_xact_lock($1)", key))
        await until_waiting(owner, key)
        cancelled_pid = await owner.fetchval(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            " AND (classid::bigint << 32 | objid::bigint) = $1", key)
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
    assert pool.in_use == 0
    assert cancelled_pid not in await backend_pids(pool, 2)  # closed, not handed out again
    assert await pool.fetchval("SELECT 1") == 1


async def test_callers_wait_in_line_when_every_connection_is_in_use(pool: Pool, database_url: str) -> None:
    assert pool.spare
    async with lock_held(database_url) as (owner, key):
        holders = [asyncio.ensure_future(pool.fetchval("SELECT 1 FROM pg_advisory_xact_lock($1)", key)) for _ in range(2)]
        await until_waiting(owner, key, 2)
        assert pool.size == 2 and not pool.spare
        queued = asyncio.ensure_future(pool.fetchval("SELECT 42"))
        gave_up = asyncio.ensure_future(pool.fetchval("SELECT 43"))
        last = asyncio.ensure_future(pool.fetchval("SELECT 44"))
        await owner.fetchval("SELECT 1")  # a round trip, during which the three take their first steps
        assert pool.waiting == 3
        gave_up.cancel()  # a caller that leaves the line does not take a turn with it
        await owner.execute("SELECT pg_advisory_unlock($1)", key)
        assert await asyncio.gather(*holders, queued, last) == [1, 1, 42, 44]
        assert gave_up.cancelled()
    assert pool.size == 2
    assert pool.in_use == 0 and pool.spare


async def test_a_closed_pool_closes_connections_as_they_come_back(pool: Pool, database_url: str) -> None:
    async with lock_held(database_url) as (owner, key):
        held = asyncio.ensure_future(pool.fetchval("SELECT 1 FROM pg_advisory_xact_lock($1)", key))
        await until_waiting(owner, key)
        await pool.close()
        await owner.execute("SELECT pg_advisory_unlock($1)", key)
        await held
    assert pool.size == 0
    with pytest.raises(asyncpg.InterfaceError):
        await pool.fetchval("SELECT 1")
