"""The quota check in front of every provider call, its refusals and its ``X-RateLimit-*`` headers."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from redis.exceptions import RedisError, ResponseError

from gateway.edge.errors import GatewayError, StreamAlreadyActive, Unavailable
from gateway.edge.metrics import QUOTA_REFUSALS, timed
from storage.quotas import UNLIMITED, Decision, Lease, QuotaStore, Ticket

logger = logging.getLogger("gateway.streaming.admission")


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
    """A stream let through: its ticket (None when the quota store was down and the mode is open), the
    store's decision and the tokens it reserved."""

    ticket: Ticket | None
    headers: dict[str, str] = field(default_factory=dict)
    decision: Decision | None = None
    reserved: int = 0

    def covers(self, tokens: int) -> bool:
        """Whether the budgets' headroom would cover ``tokens`` more: ``cover`` cannot refuse that many."""
        decision = self.decision
        return decision is None or decision.headroom == UNLIMITED or decision.headroom >= tokens


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


def _plus(value: int, change: int) -> int:
    """A count with ``change`` applied, at least zero; an unlimited one stays unlimited."""
    return value if value == UNLIMITED else max(value + change, 0)


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
        except ResponseError:
            # The script refused its arguments before writing anything: a bug of ours, not an outage, so
            # never a reason to let the stream through unchecked.
            logger.exception("the admission script failed", extra={"org": org_id, "user": user_id})
            raise GatewayError() from None
        except (RedisError, OSError):
            if not self.fail_open:
                raise Unavailable("The quota store is unavailable") from None
            logger.warning("quota store unavailable; stream let through (fail mode open)",
                           extra={"org": org_id, "user": user_id})
            return Admission(None)
        if decision.code == "stream_active":
            raise StreamAlreadyActive()
        if not decision.admitted:
            raise self._refusal(decision)
        return Admission(decision.ticket, rate_limit_headers(decision), decision, estimate)

    def cover(self, admission: Admission, extra: int) -> Admission:
        """The admitted stream's estimate grew by ``extra`` tokens (its chat's history, read while it was
        being admitted): the admission again if the budgets' headroom covers them, else the refusal it
        would have had, to be raised after ``withdraw``. Only a stream of the same budget admitted in
        between can make the two checks differ from one; the reservation grows in ``grow``."""
        decision = admission.decision
        if decision is None or extra <= 0:
            return admission
        if not admission.covers(extra):
            raise self._refusal(replace(
                decision, code="quota_exceeded", retry_after_s=decision.headroom_reset_s,
                tokens_remaining=_plus(decision.tokens_remaining, admission.reserved),
                requests_remaining=_plus(decision.requests_remaining, 1)))
        grown = replace(decision, tokens_remaining=_plus(decision.tokens_remaining, -extra),
                        headroom=_plus(decision.headroom, -extra))
        return Admission(admission.ticket, rate_limit_headers(grown), grown, admission.reserved + extra)

    def _refusal(self, decision: Decision) -> GatewayError:
        QUOTA_REFUSALS.labels(decision.code).inc()
        headers = rate_limit_headers(decision)
        headers["Retry-After"] = str(max(decision.retry_after_s, 1))
        return _REFUSALS[decision.code](headers=headers)

    async def grow(self, ticket: Ticket | None, tokens: int) -> None:
        """Count ``tokens`` more in a running stream's reservation (see ``cover``); on a Redis failure the
        settlement at its end still charges what it used."""
        if ticket is None or tokens <= 0:
            return
        try:
            await self.store.grow(ticket, tokens)
        except (RedisError, OSError):
            logger.warning("growing a quota reservation failed", exc_info=True)

    async def extend(self, ticket: Ticket | None, tokens: int) -> bool:
        """Whether a running stream's budgets cover ``tokens`` more of output (reserved if so). With the
        store down the stream goes on: its settlement still charges what it used."""
        if ticket is None:
            return True
        try:
            with timed("redis", "extend"):
                return await self.store.extend(ticket, tokens)
        except (RedisError, OSError):
            logger.warning("extending a quota reservation failed", exc_info=True)
            return True

    async def withdraw(self, admission: Admission, lease: Lease | None) -> None:
        """Undo an admission whose stream will not start: its slot, reservation, request and lease."""
        if admission.ticket is None:
            return
        try:
            await self.store.settle(admission.ticket, 0, lease, withdrawn=True)
        except (RedisError, OSError):
            logger.warning("withdrawing a quota reservation failed; it will expire", exc_info=True)

    async def settle(self, ticket: Ticket | None, charged_tokens: int, lease: Lease | None = None) -> None:
        if ticket is None:
            return
        try:
            await self.store.settle(ticket, charged_tokens, lease)
        except (RedisError, OSError):
            logger.warning("settling a quota reservation failed; it will expire", exc_info=True)
