"""This instance's running turns, coordinated with every other instance through Redis.

- One active stream per chat: the chat's lease key (``QuotaStore.lease_key``, under its org's hash tag)
  holds ``"<instance> <message id>"``. It is taken by the admission script, in the same round trip as the
  quota, freed by the settling one, and renewed by this instance while the turn runs; a crashed instance's
  lease simply expires.
- Stop from anywhere: ``POST /stop`` publishes the chat id on ``<prefix>stop``; the instance running that
  chat interrupts its turn.
- Checkpoints: every ``checkpoint_s`` the text each turn streamed since its last checkpoint is appended to
  its reply, a quarter of the due turns every ``checkpoint_s``/4, each quarter in one statement; a turn with
  reasoning or tool calls also has its parts (text included) written whole, as a piece of reasoning or a
  call's arguments grows in place.
- Kept events (storage/tapes.py): with ``GATEWAY_RESUMABLE``, every frame of a chat turn is kept in Redis
  for resumers; the registry renews the keys of this worker's turns and readers with the leases.
- A final write PostgreSQL refuses is retried for ``store_retry_s``; past that the reply is kept with the
  turn's events, and stored from there once PostgreSQL is back.
- Recovery: a reply left ``streaming`` whose lease is gone (or, at startup, still names this instance id),
  and whose kept events no instance holds, is stored from those events: whole, when its turn ended but
  could not be stored; else ``interrupted``, with the text its events or its last checkpoint hold,
  whichever is longer, and its resumers told (``error interrupted``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.edge.metrics import (
    ACTIVE_STREAMS,
    PROVIDER_ERRORS,
    STREAM_DURATION,
    STREAM_ENDINGS,
    TIME_TO_FIRST_TOKEN,
    TOKENS_OUT,
    timed,
)
from gateway.settings import Settings
from gateway.streaming.admission import QuotaGuard
from gateway.streaming.replay import kept_reply, lost_frame
from gateway.streaming.turns import Turn
from providers.registry import ProviderRegistry
from storage.chats import prune_chat_moves
from storage.db import OUTAGES, STORE_FAILURES, Pool
from storage.messages import (
    FinishedReply,
    checkpoint_replies,
    finish_reply,
    interrupt_kept_reply,
    interrupt_replies,
    streaming_replies,
)
from storage.quotas import REDIS_BATCH, Lease
from storage.tapes import Tapes, reply_from
from storage.usage import UsageEntry, record_usage

logger = logging.getLogger("gateway.streaming.registry")

_CHECKPOINT_SLICES = 4
_RECONNECT_S = 1.0
_STORE_RETRY_FIRST_S, _STORE_RETRY_MOST_S = 0.1, 2.0
_MAINTENANCE_FAILURES: tuple[type[Exception], ...] = (RedisError, *STORE_FAILURES)


def record_ending(turn: Turn) -> None:
    STREAM_ENDINGS.labels(turn.ending or "stop").inc()
    TOKENS_OUT.inc(len(turn.parts))
    STREAM_DURATION.observe(turn.duration_ms / 1000)
    if turn.first_token_s is not None:
        TIME_TO_FIRST_TOKEN.observe(turn.first_token_s)
    if turn.error is not None:
        PROVIDER_ERRORS.labels(turn.error.code).inc()


def reply_of(turn: Turn, charged: int) -> FinishedReply:
    assert turn.ids is not None
    usage, estimated = turn.final_usage()
    metadata: dict[str, object] = {"duration_ms": turn.duration_ms, "provider": turn.model.partition("/")[0]}
    if turn.request.reasoning_effort is not None:
        metadata["reasoning_effort"] = turn.request.reasoning_effort
    if turn.first_token_s is not None:
        metadata["ttft_ms"] = round(turn.first_token_s * 1000, 1)
    if turn.error is not None:
        metadata["error"] = {"code": turn.error.code, "message": turn.error.message}
    return FinishedReply(
        turn.ids.assistant_message_id, turn.text, turn.status, turn.ending or "stop", turn.model,
        usage.input_tokens, usage.output_tokens, estimated, metadata, charged, turn.stored_parts(),
        usage.reasoning_tokens,
    )


def usage_of(turn: Turn, charged: int) -> UsageEntry:
    assert turn.owner is not None
    usage, estimated = turn.final_usage()
    return UsageEntry(turn.owner.org_id, turn.owner.user_id, None, None, turn.model, usage.input_tokens,
                      usage.output_tokens, charged, estimated, reasoning_tokens=usage.reasoning_tokens)


class StreamRegistry:
    """Running turns by chat id, with their leases, stop channel, checkpoints and recovery."""

    def __init__(
        self, settings: Settings, pool: Pool, redis: Redis, quotas: QuotaGuard, providers: ProviderRegistry
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.redis = redis
        self.quotas = quotas
        self.providers = providers  # where a turn's model is found, and its fallbacks
        self.instance_id = settings.instance_id or uuid.uuid4().hex
        self.turns: dict[uuid.UUID, Turn] = {}  # chat turns, by chat id
        self.running: set[Turn] = set()  # every turn, chat or not: renewed, and interrupted at shutdown
        self._idle = asyncio.Event()
        self._idle.set()
        self._lease_ms = int(settings.stream_lease_s * 1000)
        self._stop_channel = f"{settings.redis_prefix}stop"
        self._tasks: list[asyncio.Task[None]] = []
        self._subscribed = asyncio.Event()
        self.tapes = Tapes(redis, settings.redis_prefix, settings.resume_flush_s, settings.resume_retention_s,
                           settings.stream_lease_s, settings.max_readers_per_turn,
                           self.instance_id) if settings.resumable else None

    def lease(self, org_id: str, chat_id: uuid.UUID, message_id: uuid.UUID) -> Lease:
        """The lease a chat turn takes with its admission (see ``QuotaGuard.admit``)."""
        return Lease(self.quotas.store.lease_key(org_id, str(chat_id)), self._lease_value(message_id),
                     self._lease_ms)

    def _lease_value(self, message_id: uuid.UUID) -> str:
        return f"{self.instance_id} {message_id}"

    async def release(self, lease: Lease) -> None:
        try:
            await self.quotas.store.release(lease)
        except (RedisError, OSError):
            logger.warning("releasing a stream lease failed; it will expire", exc_info=True)

    # -- turns ------------------------------------------------------------------------------------

    def add(self, turn: Turn) -> None:
        if turn.ids is not None:
            self.turns[turn.ids.chat_id] = turn
        self.running.add(turn)
        self._idle.clear()
        ACTIVE_STREAMS.inc()

    async def finish(self, turn: Turn) -> None:
        """Persist a turn's ending and its usage, settle its quota, free its chat. Called once, by the turn."""
        charged = 0
        try:
            charged = turn.charged_tokens()
            record_ending(turn)
            with timed("postgres", "finish"):
                if turn.ids is not None:
                    await self._store(turn, reply_of(turn, charged))
                else:
                    await record_usage(self.pool, usage_of(turn, charged))
        except Exception:
            logger.exception("storing a finished turn failed", extra={"model": turn.model})
        finally:
            await self._free(turn, charged)  # whatever happened above, its slot and reservation are settled

    async def _store(self, turn: Turn, reply: FinishedReply) -> None:
        """The reply's final write, retried with backoff while PostgreSQL is away (the turn's client waits
        for ``done``, pinged); past ``store_retry_s`` it is left in ``turn.unstored`` for the turn's kept
        events, and its client is told."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.store_retry_s
        wait = _STORE_RETRY_FIRST_S
        while True:
            try:
                await finish_reply(self.pool, reply)
                return
            except OUTAGES:
                if loop.time() + wait > deadline:
                    turn.unstored = reply
                    logger.error("a reply could not be stored; it waits in its kept events",
                                 extra={"message_id": str(reply.message_id)}, exc_info=True)
                    return
            await asyncio.sleep(wait)
            wait = min(wait * 2, _STORE_RETRY_MOST_S)

    async def abandon(self, turn: Turn) -> None:
        """A turn whose messages could not be stored: nothing to persist or charge; its chat is freed."""
        await self._free(turn, 0)

    async def _free(self, turn: Turn, charged: int) -> None:
        ticket, ids = turn.ticket, turn.ids
        lease = self.lease(ticket.org_id, ids.chat_id, ids.assistant_message_id) if ticket and ids else None
        await self.quotas.settle(ticket, charged, lease)
        if ids is not None and self.turns.get(ids.chat_id) is turn:
            del self.turns[ids.chat_id]
        self.running.discard(turn)
        ACTIVE_STREAMS.dec()
        if not self.running:
            self._idle.set()

    async def request_stop(self, org_id: str, chat_id: uuid.UUID) -> bool:
        """Ask whichever instance runs the chat's stream to stop it; False when none runs."""
        if not await self.redis.exists(self.quotas.store.lease_key(org_id, str(chat_id))):
            return False
        await self.redis.publish(self._stop_channel, str(chat_id))
        return True

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.recover(startup=True)
        self._tasks = [asyncio.create_task(self._listen()), asyncio.create_task(self._maintain()),
                       asyncio.create_task(self._keep_alive())]
        await self._subscribed.wait()

    async def close(self, timeout_s: float) -> None:
        """Interrupt what still runs, wait (bounded) for every ending to be stored, stop the loops."""
        for turn in list(self.running):
            turn.interrupt("interrupted")
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            logger.error("turns still unfinished at shutdown", extra={"count": len(self.running)})
        if self.tapes is not None:
            await self.tapes.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _listen(self) -> None:
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(self._stop_channel)
                    self._subscribed.set()
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            self._stop_local(message["data"])
            except RedisError:
                logger.warning("stop channel lost; resubscribing", exc_info=True)
                await asyncio.sleep(_RECONNECT_S)

    def _stop_local(self, data: bytes) -> None:
        try:
            turn = self.turns.get(uuid.UUID(data.decode()))
        except ValueError:
            return
        if turn is not None:
            turn.interrupt("cancelled")

    async def _maintain(self) -> None:
        # Each turn is checkpointed every ``checkpoint_s``, but the loop wakes four times as often and
        # writes only the turns that are due, so one statement never carries every stream at once (with
        # 1,000 streams, one 1,000-row UPDATE every 2 s stalled every stream's tokens past 200 ms).
        tick_s = self.settings.checkpoint_s / _CHECKPOINT_SLICES
        # The sweep runs three times per lease; renewals have a loop of their own (``_keep_alive``).
        renew_every = max(1, int(self.settings.stream_lease_s / 3 / tick_s))
        tick = 0
        while True:
            await asyncio.sleep(tick_s)
            tick += 1
            try:
                await self.checkpoint()
            except _MAINTENANCE_FAILURES:
                logger.warning("checkpointing streams failed; retrying next interval", exc_info=True)
            if tick % renew_every:
                continue
            try:
                await self.recover(startup=False)
                await prune_chat_moves(self.pool)
            except _MAINTENANCE_FAILURES:
                logger.warning("stream maintenance failed; retrying next interval", exc_info=True)

    async def _keep_alive(self) -> None:
        """Renew leases, slots and kept events three times a lease, on a loop of its own: while PostgreSQL
        is away the turns run on, and a checkpoint waiting on it must not let them lapse (resumers, and
        any instance's sweep, would take them for dead)."""
        while True:
            await asyncio.sleep(self.settings.stream_lease_s / 3)
            try:
                await self.renew()
            except _MAINTENANCE_FAILURES:
                logger.warning("renewing leases failed; retrying next interval", exc_info=True)

    # -- periodic work ----------------------------------------------------------------------------

    async def checkpoint(self) -> None:
        """Append the text each turn that grew and is due (its last checkpoint ``checkpoint_s`` ago) has
        streamed since its last checkpoint, in one statement. A turn counts as checkpointed only once the
        statement succeeded, so the text of a failed one goes with its next."""
        due_turns, ids, deltas, parts = [], [], [], []
        now = time.perf_counter()
        due = now - self.settings.checkpoint_s
        for chat_turn in self.turns.values():
            done = chat_turn.checkpointed_parts
            moved = len(chat_turn.parts) != done or chat_turn.shape != chat_turn.checkpointed_shape
            if chat_turn.ending is None and chat_turn.checkpointed_at <= due and moved:
                assert chat_turn.ids is not None
                chat_turn.checkpointed_at = now
                upto, shape = len(chat_turn.parts), chat_turn.shape
                due_turns.append((chat_turn, upto, shape))
                ids.append(chat_turn.ids.assistant_message_id)
                deltas.append("".join(chat_turn.parts[done:upto]))
                parts.append(chat_turn.stored_parts())
        if ids:
            await checkpoint_replies(self.pool, ids, deltas, parts)
            for chat_turn, upto, shape in due_turns:
                chat_turn.checkpointed_parts, chat_turn.checkpointed_shape = upto, shape

    async def renew(self) -> None:
        """Push back the quota slots and reservations of every running turn, and its chat's lease."""
        tickets, leases = [], []
        for turn in list(self.running):
            if turn.ticket is not None:
                tickets.append(turn.ticket)
                if turn.ids is not None:
                    leases.append(self.lease(turn.ticket.org_id, turn.ids.chat_id, turn.ids.assistant_message_id))
        await self.quotas.store.renew(tickets, leases)
        if self.tapes is not None:
            await self.tapes.renew()

    async def recover(self, *, startup: bool) -> int:
        """Mark replies whose stream died as ``interrupted``; return how many."""
        rows = await streaming_replies(self.pool, 0)
        if not rows:
            return 0
        keys = [self.quotas.store.lease_key(org_id, str(chat_id)) for _, chat_id, org_id in rows]
        leases = []
        for start in range(0, len(keys), REDIS_BATCH):
            leases += await self.redis.mget(keys[start:start + REDIS_BATCH])
        ours = f"{self.instance_id} ".encode()
        lease: bytes | None
        dead, stale_leases = [], []
        for (message_id, chat_id, org_id), lease in zip(rows, leases, strict=True):  # type: ignore[assignment]
            if lease is not None and startup and lease.startswith(ours):
                stale_leases.append(self.lease(org_id, chat_id, message_id))
                dead.append(message_id)
            elif lease is None or not lease.endswith(str(message_id).encode()):
                dead.append(message_id)
        chats = {message_id: chat_id for message_id, chat_id, _ in rows}
        if self.tapes is not None and dead:
            dead = await self._recover_kept(self.tapes, [(message_id, chats[message_id]) for message_id in dead],
                                            startup)
        marked = await interrupt_replies(self.pool, dead) if dead else 0
        for stale in stale_leases:
            await self.release(stale)
        if marked:
            logger.info("interrupted replies of dead streams", extra={"count": marked})
        return marked

    async def _recover_kept(
        self, tapes: Tapes, dead: list[tuple[uuid.UUID, uuid.UUID]], startup: bool
    ) -> list[uuid.UUID]:
        """Store the replies of dead turns from their kept events; return those with none kept. A turn
        whose instance still holds its events is not dead: it is storing its end (unless that instance is
        this one, starting: it died)."""
        keys = [tapes.turn_key(chat_id, message_id) for message_id, chat_id in dead]
        holders = await tapes.held(keys)
        alive = [holder is not None and not (startup and holder == self.instance_id) for holder in holders]
        dead = [turn for turn, held in zip(dead, alive, strict=True) if not held]
        keys = [key for key, held in zip(keys, alive, strict=True) if not held]
        left = []
        for (message_id, _), key, entries in zip(dead, keys, await tapes.everything(keys), strict=True):
            if not entries:
                left.append(message_id)
                continue
            last, fields = entries[-1]
            if b"r" in fields:
                await finish_reply(self.pool, reply_from(fields[b"r"]))
                continue
            content, parts = kept_reply(entries)
            await interrupt_kept_reply(self.pool, message_id, content, parts)
            if b"e" not in fields:
                await tapes.end_lost(key, last + 1, lost_frame(entries, last + 1))
        return left
