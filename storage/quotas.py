"""Usage quotas in Redis: one atomic admission per stream, settled to the real usage at its end.

Limits: a token budget per user and per org over a period (``day`` or ``month``, resetting at the UTC
boundary), requests per minute per user and per org (each a sliding window over the last 60 s: exact, one
entry per request), and concurrent streams per user. Every key of an org carries the org id as its hash
tag, so one org's user and org counters live in one slot and the scripts also run on Redis Cluster.

A stream's slot and reservation carry an expiry that the running instance renews; a crashed instance's
expire by themselves and are dropped by the next admission.
"""

from __future__ import annotations

import calendar
import functools
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from storage.scripts import Script, ScriptClient
from storage.usage import QuotaOverride

_LUA = Path(__file__).with_name("lua")
UNLIMITED = -1
_DAY_S = 86_400
# Commands per pipeline in periodic work over every stream. redis-py packs and parses a pipeline's commands
# on the event loop in one go: 8,000 at once held the loop past the 200 ms that counts as a stall for
# every stream; 256 hold it for a few milliseconds.
REDIS_BATCH = 256

LoadLimits = Callable[[str, str, str], Awaitable[QuotaOverride | None]]


@dataclass(frozen=True, slots=True)
class QuotaDefaults:
    """Limits for subjects with no override; None is unlimited."""

    user_tokens: int | None = None
    org_tokens: int | None = None
    period: str = "day"
    requests_per_minute: int | None = None
    max_concurrent_streams: int | None = None
    org_requests_per_minute: int | None = None


@dataclass(frozen=True, slots=True)
class Ticket:
    """What settling a stream needs: its id, whom it was admitted for, the periods its usage counts in
    (``d20260501`` or ``m202605``, user's then org's) and how long those counters live. Its Redis keys are
    derived when used: a running stream holds no key strings."""

    stream_id: str
    org_id: str
    user_id: str
    periods: tuple[str, str]
    ttls: tuple[int, int]


@dataclass(frozen=True, slots=True)
class Lease:
    """A chat's one-stream lease, taken in the same script as the admission: its key (``lease_key``), the
    value that names the stream holding it, and for how long."""

    key: str
    value: str
    ms: int


@dataclass(frozen=True, slots=True)
class Decision:
    code: str  # "ok", "too_many_streams", "rate_limited", "quota_exceeded" or "stream_active"
    retry_after_s: int
    token_limit: int
    tokens_remaining: int
    token_reset_s: int
    request_limit: int  # of the tighter request rate, the user's or the org's: the one with fewer left
    requests_remaining: int
    ticket: Ticket | None
    headroom: int = UNLIMITED  # tokens the tighter budget has left after this reservation
    headroom_reset_s: int = 0

    @property
    def admitted(self) -> bool:
        return self.code == "ok"


@dataclass(frozen=True, slots=True)
class PeriodBounds:
    day: str
    day_reset_ms: int
    month: str
    month_reset_ms: int


def period_bounds(now_s: float) -> PeriodBounds:
    """The current UTC day and month, and when each ends (worked out once a day: 10 us an admission)."""
    return _day_bounds(int(now_s // _DAY_S))


@functools.lru_cache(maxsize=4)
def _day_bounds(day: int) -> PeriodBounds:
    moment = datetime.fromtimestamp(day * _DAY_S, UTC)
    day_start = day * _DAY_S
    next_month = (moment.year + moment.month // 12, moment.month % 12 + 1)
    month_end = calendar.timegm((*next_month, 1, 0, 0, 0))
    return PeriodBounds(
        moment.strftime("d%Y%m%d"), (day_start + _DAY_S) * 1000, moment.strftime("m%Y%m"), month_end * 1000
    )


def _limit(value: int | None) -> int:
    return UNLIMITED if value is None else value


class QuotaStore:
    """Admission, settlement and reporting of quotas; ``clock`` is injectable so tests can move time."""

    def __init__(
        self,
        redis: Redis,
        prefix: str,
        defaults: QuotaDefaults,
        slot_ttl_s: float,
        load_limits: LoadLimits,
        limits_cache_s: int = 300,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.defaults = defaults
        self.slot_ttl_ms = int(slot_ttl_s * 1000)
        self.load_limits = load_limits
        self.limits_cache_s = limits_cache_s
        self.clock = clock
        self.scripts = ScriptClient.like(redis)
        prelude = (_LUA / "limits.lua").read_text()
        self._reserve = Script(prelude + (_LUA / "reserve.lua").read_text())
        self._settle = Script(prelude + (_LUA / "settle.lua").read_text())
        self._grow = Script(prelude + (_LUA / "grow.lua").read_text())
        self._extend = Script(prelude + (_LUA / "extend.lua").read_text())
        self._release = Script((_LUA / "release.lua").read_text())
        self._usage = Script(prelude + (_LUA / "usage.lua").read_text())

    async def aclose(self) -> None:
        await self.scripts.aclose()

    # -- keys ---------------------------------------------------------------------------------------

    def _key(self, org_id: str, *parts: str) -> str:
        return f"{self.prefix}q:{{{org_id}}}:" + ":".join(parts)

    def lease_key(self, org_id: str, chat_id: str) -> str:
        """A chat's stream lease; it carries the org's hash tag so the admission script can take it."""
        return self._key(org_id, "lease", chat_id)

    def limits_key(self, org_id: str, scope: str, subject_id: str) -> str:
        return self._key(org_id, scope, subject_id, "limits")

    def _keys(self, org_id: str, user_id: str, bounds: PeriodBounds) -> list[str]:
        user, org = ("user", user_id), ("org", org_id)
        return [
            self._key(org_id, *user, "active"), self._key(org_id, *user, "reserved"),
            self._key(org_id, *user, "used", bounds.day), self._key(org_id, *user, "used", bounds.month),
            self.limits_key(org_id, *user),
            self._key(org_id, *org, "active"), self._key(org_id, *org, "reserved"),
            self._key(org_id, *org, "used", bounds.day), self._key(org_id, *org, "used", bounds.month),
            self.limits_key(org_id, *org),
            self._key(org_id, *user, "requests"), self._key(org_id, *org, "requests"),
        ]

    def _active_keys(self, ticket: Ticket) -> tuple[str, str]:
        """The stream's concurrency slots: the user's and the org's."""
        return (self._key(ticket.org_id, "user", ticket.user_id, "active"),
                self._key(ticket.org_id, "org", ticket.org_id, "active"))

    def _reserved_keys(self, ticket: Ticket) -> tuple[str, str]:
        """The stream's token reservations: the user's and the org's."""
        return (self._key(ticket.org_id, "user", ticket.user_id, "reserved"),
                self._key(ticket.org_id, "org", ticket.org_id, "reserved"))

    def _args(self, now_ms: int, bounds: PeriodBounds) -> list[Any]:
        d = self.defaults
        return [now_ms, bounds.day_reset_ms, bounds.month_reset_ms, _limit(d.user_tokens), _limit(d.org_tokens),
                d.period, _limit(d.requests_per_minute), _limit(d.max_concurrent_streams),
                _limit(d.org_requests_per_minute)]

    # -- admission and settlement -------------------------------------------------------------------

    async def reserve(
        self, org_id: str, user_id: str, stream_id: str, estimate: int, lease: Lease | None = None
    ) -> Decision:
        """Check every limit and, if all pass, take a slot and reserve ``estimate`` tokens: one round trip.

        With ``lease``, the stream also takes its chat's lease, and is refused (``stream_active``) while
        another stream holds it; a refusal for a limit comes first."""
        while True:
            now_ms = int(self.clock() * 1000)
            bounds = period_bounds(now_ms / 1000)
            keys = self._keys(org_id, user_id, bounds)
            now, day_reset, month_reset, *defaults = self._args(now_ms, bounds)
            args = [now, stream_id, estimate, now_ms + self.slot_ttl_ms, day_reset, month_reset, *defaults,
                    math.ceil(self.slot_ttl_ms / 1000) * 3]
            if lease is not None:
                keys.append(lease.key)
                args += [lease.value, lease.ms]
            result = await self.scripts.run(self._reserve, keys, args)
            if result[0] == b"limits":
                await self._cache_limits(org_id, user_id, result[1].decode())
                continue
            return self._decision(result, org_id, user_id, bounds, stream_id, now_ms)

    def _decision(
        self, result: list[Any], org_id: str, user_id: str, bounds: PeriodBounds, stream_id: str, now_ms: int
    ) -> Decision:
        code = result[0].decode()
        ticket = None
        if code == "ok":
            user_month, org_month = result[7] == b"month", result[8] == b"month"
            user_reset = bounds.month_reset_ms if user_month else bounds.day_reset_ms
            org_reset = bounds.month_reset_ms if org_month else bounds.day_reset_ms
            ticket = Ticket(
                stream_id, org_id, user_id,
                (bounds.month if user_month else bounds.day, bounds.month if org_month else bounds.day),
                ((user_reset - now_ms) // 1000 + _DAY_S, (org_reset - now_ms) // 1000 + _DAY_S),
            )
        return Decision(
            code, math.ceil(max(int(result[1]), 0) / 1000), int(result[2]), int(result[3]),
            math.ceil(int(result[4]) / 1000), int(result[5]), int(result[6]), ticket,
            int(result[9]), math.ceil(int(result[10]) / 1000),
        )

    async def settle(
        self, ticket: Ticket, charged_tokens: int, lease: Lease | None = None, *, withdrawn: bool = False
    ) -> None:
        """Replace the stream's reservation by what it really used, and free its slot (and its chat's
        lease, if it still holds it). A ``withdrawn`` stream, refused after its admission, no longer
        counts as a request either, of the user or of the org: its admission leaves no trace."""
        user, org = self._active_keys(ticket)
        user_reserved, org_reserved = self._reserved_keys(ticket)
        keys = [user, user_reserved, self._key(ticket.org_id, "user", ticket.user_id, "used", ticket.periods[0]),
                org, org_reserved, self._key(ticket.org_id, "org", ticket.org_id, "used", ticket.periods[1]),
                self._key(ticket.org_id, "user", ticket.user_id, "requests"),
                self._key(ticket.org_id, "org", ticket.org_id, "requests")]
        args: list[Any] = [ticket.stream_id, charged_tokens, *ticket.ttls, int(withdrawn)]
        if lease is not None:
            keys.append(lease.key)
            args.append(lease.value)
        await self.scripts.run(self._settle, keys, args)

    async def grow(self, ticket: Ticket, tokens: int) -> None:
        """Add ``tokens`` to a running stream's reservation (a no-op once it is settled)."""
        await self.scripts.run(self._grow, self._reserved_keys(ticket), [ticket.stream_id, tokens])

    async def extend(self, ticket: Ticket, tokens: int) -> bool:
        """Add ``tokens`` to a running stream's reservation if both budgets cover them; False when they do
        not. A reservation already settled or expired is left alone (True: nothing to refuse)."""
        while True:
            now_ms = int(self.clock() * 1000)
            bounds = period_bounds(now_ms / 1000)
            now, *rest = self._args(now_ms, bounds)
            keys = self._keys(ticket.org_id, ticket.user_id, bounds)[:10]
            result = await self.scripts.run(self._extend, keys, [now, ticket.stream_id, tokens, "", *rest])
            if result[0] == b"limits":
                await self._cache_limits(ticket.org_id, ticket.user_id, result[1].decode())
                continue
            return bool(result[0] != b"quota_exceeded")

    async def renew(self, tickets: Iterable[Ticket], leases: Iterable[Lease] = ()) -> None:
        """Push back the expiry of running streams' slots and reservations, and of their chats' leases
        (pipelines of ``REDIS_BATCH`` commands)."""
        expiry = int(self.clock() * 1000) + self.slot_ttl_ms
        commands: list[tuple[Any, ...]] = [
            ("ZADD", key, "XX", expiry, ticket.stream_id) for ticket in tickets for key in self._active_keys(ticket)
        ]
        commands += [("PEXPIRE", lease.key, lease.ms) for lease in leases]
        for start in range(0, len(commands), REDIS_BATCH):
            async with self.redis.pipeline(transaction=False) as pipe:
                for command in commands[start:start + REDIS_BATCH]:
                    pipe.execute_command(*command)
                await pipe.execute()

    async def release(self, lease: Lease) -> None:
        """Free a chat's lease if it is still the one given (a stale lease found at startup)."""
        await self.scripts.run(self._release, [lease.key], [lease.value])

    # -- limits cache and reporting -----------------------------------------------------------------

    async def _cache_limits(self, org_id: str, user_id: str, scope: str) -> None:
        subject = user_id if scope == "user" else org_id
        override = await self.load_limits(org_id, scope, subject)
        fields: dict[str, str | int] = {"loaded": 1}
        if override is not None:
            fields["period"] = override.period
            for name, value in (("tokens", override.tokens_per_period), ("rpm", override.requests_per_minute),
                                ("concurrent", override.max_concurrent_streams)):
                if value is not None:
                    fields[name] = value
        key = self.limits_key(org_id, scope, subject)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping=fields)  # type: ignore[arg-type]  # the stub's Mapping is invariant
            pipe.expire(key, self.limits_cache_s)
            await pipe.execute()

    async def forget_limits(self, org_id: str, scope: str, subject_id: str) -> None:
        """Drop a cached override so the next admission reads the new one."""
        await self.redis.delete(self.limits_key(org_id, scope, subject_id))

    async def usage(self, org_id: str, user_id: str) -> dict[str, Any]:
        while True:
            now_ms = int(self.clock() * 1000)
            bounds = period_bounds(now_ms / 1000)
            result = await self.scripts.run(self._usage, self._keys(org_id, user_id, bounds), [
                now_ms, "", "", "", *self._args(now_ms, bounds)[1:]])
            if result[0] == b"limits":
                await self._cache_limits(org_id, user_id, result[1].decode())
                continue
            return _usage_report(result, now_ms)


def _usage_report(r: list[Any], now_ms: int) -> dict[str, Any]:
    def budget(limit: int, used: int, reserved: int, reset_ms: int, period: bytes) -> dict[str, Any]:
        unlimited = limit == UNLIMITED
        return {
            "period": period.decode(), "limit": None if unlimited else limit, "used": used,
            "reserved": reserved, "remaining": None if unlimited else max(limit - used - reserved, 0),
            "resets_at": datetime.fromtimestamp((now_ms + reset_ms) / 1000, UTC).isoformat(),
            "resets_in_s": math.ceil(reset_ms / 1000),
        }

    def rate(limit: int, used: int) -> dict[str, Any]:
        unlimited = limit == UNLIMITED
        return {"limit": None if unlimited else limit, "used": used,
                "remaining": None if unlimited else max(limit - used, 0)}

    concurrency = int(r[11])
    return {
        "user_tokens": budget(int(r[1]), int(r[2]), int(r[3]), int(r[4]), r[13]),
        "org_tokens": budget(int(r[5]), int(r[6]), int(r[7]), int(r[8]), r[14]),
        "requests_per_minute": rate(int(r[9]), int(r[10])),
        "org_requests_per_minute": rate(int(r[15]), int(r[16])),
        "concurrent_streams": {"limit": None if concurrency == UNLIMITED else concurrency,
                               "active": int(r[12])},
    }
