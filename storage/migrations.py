"""Numbered, forward-only SQL migrations, applied once under a PostgreSQL advisory lock.

Each file in ``sql/`` (``0001_init.sql``, ...) runs in its own transaction and is recorded in
``schema_migrations``. Several instances starting at once serialise on the lock, so each file runs once.
"""

from __future__ import annotations

import logging
from pathlib import Path

import asyncpg

logger = logging.getLogger("storage.migrations")

# An arbitrary constant that names the migration lock for every instance.
_LOCK_KEY = 0x5354_5247  # "STRG"


def migrations_dir() -> Path:
    packaged = Path(__file__).with_name("migrations")  # a built wheel carries sql/ here
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "sql"


def pending_files(folder: Path, applied: set[str]) -> list[Path]:
    return [path for path in sorted(folder.glob("[0-9]*.sql")) if path.stem not in applied]


async def migrate(dsn: str, folder: Path | None = None) -> list[str]:
    """Apply the migrations not yet recorded; return the versions applied by this call."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        try:
            return await _apply_pending(conn, folder or migrations_dir())
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    finally:
        await conn.close()


async def _apply_pending(conn: asyncpg.Connection, folder: Path) -> list[str]:
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
    )
    applied = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
    done = []
    for path in pending_files(folder, applied):
        async with conn.transaction():
            await conn.execute(path.read_text())
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", path.stem)
        logger.info("migration applied", extra={"version": path.stem})
        done.append(path.stem)
    return done
