"""The file aggregate: uploads owned by (org_id, user_id), their bytes in chunks of ``CHUNK_BYTES``.

Every statement filters by the owner in SQL, but a chunk's read, which follows a read of its file that did.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from storage.chats import Executor, Owner
from storage.db import Pool
from storage.queries import SQL

# The size of a stored chunk: large enough that a 20 MiB file is 20 rows, small enough that asyncpg's copy
# of the one being written or read stays small beside the file.
CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class NewFile:
    """An upload that passed its checks: its bytes (a buffer the caller no longer changes) and their digest."""

    name: str
    media_type: str
    data: bytearray
    sha256: str


@dataclass(frozen=True, slots=True)
class FileData:
    """A file as a model is given it; ``data`` is None when it was left out to keep a request's files
    within their budget."""

    id: uuid.UUID
    name: str
    media_type: str
    size: int
    data: bytes | None


class StorageLimitExceeded(Exception):
    """The upload would take the owner's files past their storage cap."""


def file_record(row: asyncpg.Record) -> dict[str, Any]:
    return {"id": row["id"], "name": row["name"], "media_type": row["media_type"], "size": row["size"],
            "sha256": row["sha256"], "created_at": row["created_at"]}


def chunks_of(file_id: uuid.UUID, data: bytearray) -> Iterator[tuple[uuid.UUID, int, memoryview]]:
    """The rows of ``data``'s chunks: views of the buffer, never copies of it."""
    view = memoryview(data)
    for seq, start in enumerate(range(0, len(data), CHUNK_BYTES)):
        yield file_id, seq, view[start:start + CHUNK_BYTES]


async def insert_file(pool: Pool, owner: Owner, new: NewFile, cap: int | None) -> dict[str, Any]:
    """Store the file and its chunks in one transaction; past ``cap`` bytes for the owner (with this file)
    nothing is stored and StorageLimitExceeded raised."""
    file_id = uuid.uuid4()
    async with pool.acquire() as conn, conn.transaction():
        if cap is not None:
            await conn.execute(SQL["lock_file_owner"], owner.org_id, owner.user_id)
            if await conn.fetchval(SQL["stored_bytes"], owner.org_id, owner.user_id) + len(new.data) > cap:
                raise StorageLimitExceeded()
        row = await conn.fetchrow(SQL["insert_file"], file_id, owner.org_id, owner.user_id, new.name,
                                  new.media_type, len(new.data), new.sha256)
        # One statement a chunk, not executemany: that one gathers four chunks' copies before each send.
        for row_args in chunks_of(file_id, new.data):
            await conn.execute(SQL["insert_file_chunk"], *row_args)
    assert row is not None
    return file_record(row)


async def get_file(db: Executor, owner: Owner, file_id: uuid.UUID) -> dict[str, Any] | None:
    row = await db.fetchrow(SQL["get_file"], file_id, owner.org_id, owner.user_id)
    return file_record(row) if row else None


async def list_files(
    pool: Pool, owner: Owner, *, limit: int, offset: int, after: tuple[datetime, uuid.UUID] | None
) -> tuple[list[dict[str, Any]], int]:
    """A page of the owner's files, newest first, and how many they have: ``offset`` files in, or after
    the file ``after`` names (its creation time and id)."""
    moment, last_id = after or (None, None)
    rows = await pool.fetch(SQL["list_files"], owner.org_id, owner.user_id, limit, moment, last_id, offset)
    total = await pool.fetchval(SQL["count_files"], owner.org_id, owner.user_id)
    return [file_record(row) for row in rows], total


async def delete_file(pool: Pool, owner: Owner, file_id: uuid.UUID) -> bool:
    """Delete the file and its chunks; False when the owner has no such file."""
    return await pool.execute(SQL["delete_file"], file_id, owner.org_id, owner.user_id) == "DELETE 1"


async def file_chunk(pool: Pool, file_id: uuid.UUID, seq: int) -> bytes | None:
    """Chunk ``seq`` of a file whose owner the caller has checked; None once the file is gone."""
    data: bytes | None = await pool.fetchval(SQL["file_chunk"], file_id, seq)
    return data


async def files_for_model(
    pool: Pool, owner: Owner, file_ids: Sequence[uuid.UUID], budget: int
) -> dict[uuid.UUID, FileData]:
    """The owner's files among ``file_ids`` (missing ones, another's or deleted, are absent), with their
    bytes while their sizes, summed in the order of ``file_ids``, stay within ``budget``."""
    if not file_ids:
        return {}
    rows = await pool.fetch(SQL["files_for_model"], list(file_ids), owner.org_id, owner.user_id, budget)
    return {row["id"]: FileData(row["id"], row["name"], row["media_type"], row["size"], row["data"])
            for row in rows}
