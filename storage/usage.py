"""Quota overrides and the usage ledger in PostgreSQL."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from storage.chats import Executor
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


async def record_usage(db: Executor, entry: UsageEntry) -> None:
    args: list[Any] = [entry.org_id, entry.user_id, entry.chat_id, entry.message_id, entry.model,
                       entry.input_tokens, entry.output_tokens, entry.charged_tokens, entry.estimated, entry.kind]
    await db.execute(SQL["insert_usage"], *args)
