"""The asyncpg pool, with JSON codecs set once per connection."""

from __future__ import annotations

import asyncpg
import orjson


def _dump_json(value: object) -> str:
    return orjson.dumps(value).decode()


async def _init_connection(conn: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=_dump_json, decoder=orjson.loads, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to reset: no query of ours leaves session state behind (no SET, LISTEN, cursor or
    session-level advisory lock; the migrations' lock is taken on a connection of their own). asyncpg's
    default reset sends one more statement on every release, a round trip per query."""


async def create_pool(dsn: str, min_size: int = 2, max_size: int = 20) -> asyncpg.Pool:
    # A custom reset still has asyncpg roll back a transaction left open; it skips only the reset query.
    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=_init_connection, reset=_keep_session, command_timeout=30
    )
    assert pool is not None
    return pool
