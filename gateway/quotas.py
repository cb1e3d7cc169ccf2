"""The quota check in front of every provider call, its refusals and its ``X-RateLimit-*`` headers."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from gateway.errors import GatewayError, StreamAlreadyActive, Unavailable
from gateway.metrics import QUOTA_REFUSALS, timed
from storage.quotas import UNLIMITED, Decision, Lease, QuotaStore, Ticket

logger = logging.getLogger("gateway.quotas")


class QuotaExceeded(GatewayError):
    code, status, message = "quota_exceeded", 429, "The token budget for this period is used up"


class RateLimited(GatewayError):
    code, status, message = "rate_limited", 429, "Too many requests in the last minute"


class TooManyStreams(GatewayError):
    code, status, message = "too_many_streams", 429, "Too many streams are running at once"


_REFUSALS: dict[str, type[GatewayError]] = {
    "quota_exceeded": QuotaExceeded, "rate_limited": RateLimited, "too_many_streams": TooManyStreams,
}


@dataclass(frozen=True, slots=True)
class Admission:
    """A stream let through: its ticket (None when the quota store was down and the mode is open)."""

    ticket: Ticket | None
    headers: dict[str, str] = field(default_factory=dict)


def rate_limit_headers(decision: Decision) -> dict[str, str]:
    headers = {}
    if decision.token_limit != UNLIMITED:
        headers["X-RateLimit-Limit-Tokens"] = str(decision.token_limit)
        headers["X-RateLimit-Remaining-Tokens"] = str(decision.tokens_remaining)
        headers["X-RateLimit-Reset-Tokens"] = str(decision.token_reset_s)
    if decision.request_limit != UNLIMITED:
        headers["X-RateLimit-Limit-Requests"] = str(decision.request_limit)
        headers["X-RateLimit-Remaining-Requests"] = str(decision.requests_remaining)
    return headers


class QuotaGuard:
    """Admits or refuses a stream before any byte of it is sent, and settles it at the end."""

    def __init__(self, store: QuotaStore, fail_mode: str, default_max_tokens: int) -> None:
        self.store = store
        self.fail_open = fail_mode == "open"
        self.default_max_tokens = default_max_tokens

    def estimate(self, prompt_tokens: int, max_tokens: int | None) -> int:
        return prompt_tokens + (max_tokens or self.default_max_tokens)

    async def admit(
        self, org_id: str, user_id: str, stream_id: str, estimate: int, lease: Lease | None = None
    ) -> Admission:
        """Admit the stream (and take its chat's ``lease``), or raise the refusal. With the store down and
        the fail mode open, the stream goes ahead with neither: no quota, no one-stream-per-chat rule."""
        try:
            with timed("redis", "quota"):
                decision = await self.store.reserve(org_id, user_id, stream_id, estimate, lease)
        except (RedisError, OSError):
            if not self.fail_open:
                raise Unavailable("The quota store is unavailable") from None
            logger.warning("quota store unavailable; stream let through (fail mode open)",
                           extra={"org": org_id, "user": user_id})
            return Admission(None)
        headers = rate_limit_headers(decision)
        if decision.code == "stream_active":
            raise StreamAlreadyActive()
        if not decision.admitted:
            QUOTA_REFUSALS.labels(decision.code).inc()
            headers["Retry-After"] = str(max(decision.retry_after_s, 1))
            raise _REFUSALS[decision.code](headers=headers)
        return Admission(decision.ticket, headers)

    async def settle(self, ticket: Ticket | None, charged_tokens: int, lease: Lease | None = None) -> None:
        if ticket is None:
            return
        try:
            await self.store.settle(ticket, charged_tokens, lease)
        except (RedisError, OSError):
            logger.warning("settling a quota reservation failed; it will expire", exc_info=True)
