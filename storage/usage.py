"""Quota overrides, the usage ledger and its report in PostgreSQL."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from storage.chats import Executor
from storage.db import Pool
from storage.queries import SQL


@dataclass(frozen=True, slots=True)
class QuotaOverride:
    """Limits set for one user or org; None means the default from settings."""

    tokens_per_period: int | None = None
    period: str = "day"
    requests_per_minute: int | None = None
    max_concurrent_streams: int | None = None


async def get_override(db: Executor, org_id: str, scope: str, subject_id: str) -> QuotaOverride | None:
    row = await db.fetchrow(SQL["get_quota_override"], org_id, scope, subject_id)
    if row is None:
        return None
    return QuotaOverride(row["tokens_per_period"], row["period"], row["requests_per_minute"],
                         row["max_concurrent_streams"])


async def put_override(db: Executor, org_id: str, scope: str, subject_id: str, limits: QuotaOverride) -> None:
    await db.execute(
        SQL["put_quota_override"], org_id, scope, subject_id, limits.tokens_per_period, limits.period,
        limits.requests_per_minute, limits.max_concurrent_streams,
    )


@dataclass(frozen=True, slots=True)
class UsageEntry:
    org_id: str
    user_id: str
    chat_id: uuid.UUID | None
    message_id: uuid.UUID | None
    model: str
    input_tokens: int
    output_tokens: int
    charged_tokens: int
    estimated: bool
    kind: str = "chat"  # or "title": what the tokens paid for
    reasoning_tokens: int | None = None  # of output_tokens, those spent reasoning; None when not reported


async def record_usage(db: Executor, entry: UsageEntry) -> None:
    args: list[Any] = [entry.org_id, entry.user_id, entry.chat_id, entry.message_id, entry.model,
                       entry.input_tokens, entry.output_tokens, entry.charged_tokens, entry.estimated, entry.kind,
                       entry.reasoning_tokens]
    await db.execute(SQL["insert_usage"], *args)


Grouping = Literal["day", "model", "user"]


@dataclass(frozen=True, slots=True)
class UsageGroup:
    """The ledger's sums over one group of a report: a UTC day (``2026-05-01``), a model or a user."""

    key: str
    input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    charged_tokens: int
    requests: int


async def summarize_usage(
    db: Pool, org_id: str, user_id: str | None, start: datetime, end: datetime, group_by: Grouping
) -> list[UsageGroup]:
    """The org's ledger (with ``user_id``, that user's only) from ``start`` up to ``end``, summed by
    ``group_by``, in the order of the groups' keys.

    Planned for its own range and subject every time (0.8 ms more for a user's month here): the generic
    plan PostgreSQL may keep after five runs of a prepared statement is blind to both, and now and then
    read a user's rows through the org's index: all of a busy org's month (15-20 ms) for 2,000 rows."""
    args: list[Any] = [org_id, start, end]
    if user_id is not None:
        args.append(user_id)
    scope = "org" if user_id is None else "user"
    async with db.acquire() as conn, conn.transaction():
        await conn.execute(SQL["plan_for_the_values"])
        rows = await conn.fetch(SQL[f"usage_report_{scope}_by_{group_by}"], *args)
    return [UsageGroup(str(row["key"]), *row[1:]) for row in rows]  # a day's key is a date: 2026-05-01
