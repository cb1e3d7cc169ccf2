"""Resumable turns: every frame a chat turn streams, kept in a Redis Stream so any instance can replay it.

Keys, under the chat's hash tag (a chat's keys share a slot):
- ``<prefix>t:{<chat>}``: the chat's current turn, a hash: ``m`` its assistant message id, ``f`` the format
  of its frames (``chat`` events or the AI SDK's ``ui`` chunks), ``o`` and ``u`` its org and user.
- ``<prefix>t:{<chat>}:<message>``: the turn's frames, a stream. An entry holds one flush's frames of the
  turn (``d``), its id ``<n>-0`` with n the number of its last frame (a chat event's ``id``). The last
  entry also has ``e``; and ``r`` when the reply could not be stored: the reply to store once PostgreSQL
  is back (``kept_reply``).
- ``<turn>:live``: held by the instance running the turn (its id), renewed with its leases, deleted with
  the end's flush. A turn whose key lapsed with no end lost its instance.
- ``<turn>:readers``: the resumers reading it, a sorted set by when their place lapses.

Appends are batched for all of a worker's turns: frames wait in memory for the next flush, every
``flush_s``, one pipeline for every turn that has some, never a round trip per token. They go over a
connection of their own (``ScriptClient``), and a turn Redis refused stops being kept (``broken``) while
its stream goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from storage.chats import Owner
from storage.messages import FinishedReply
from storage.scripts import Script, ScriptClient, command

logger = logging.getLogger("storage.tapes")

CHAT, UI = "chat", "ui"
# A turn's entries kept (one flush's frames each); past that the oldest go (``MAXLEN ~``).
MAX_ENTRIES = 100_000
_READER = Script((Path(__file__).parent / "lua" / "reader.lua").read_text())


@dataclass(frozen=True, slots=True)
class Current:
    """A chat's current (or last kept) turn, as its pointer names it."""

    message_id: uuid.UUID
    format: str
    owner: Owner


Entry = tuple[int, dict[bytes, bytes]]  # an entry's last frame number, and its fields


class Tape:
    """One turn's frames on their way to Redis."""

    __slots__ = ("broken", "chat_id", "due", "ended", "format", "frames", "key", "last", "message_id", "opened",
                 "owner", "pointer", "recorder", "reply")

    def __init__(self, recorder: Tapes, chat_id: uuid.UUID, message_id: uuid.UUID, owner: Owner, format: str) -> None:
        self.recorder = recorder
        self.chat_id, self.message_id, self.owner, self.format = chat_id, message_id, owner, format
        self.key = recorder.turn_key(chat_id, message_id)
        self.pointer = recorder.pointer_key(chat_id)
        self.frames: list[bytes] = []
        self.last = 0  # the number of the last frame added
        self.opened = False  # its first flush went through
        self.due = False  # waiting for the next flush
        self.ended = False
        self.broken = False  # Redis refused it: no longer kept
        self.reply: bytes | None = None

    def add(self, data: bytes, seq: int) -> None:
        """Keep ``data``, the frames up to number ``seq``, with the next flush."""
        if self.ended or self.broken:
            return
        self.frames.append(data)
        self.last = seq
        if not self.due:
            self.due = True
            self.recorder.due(self)

    def end(self, data: bytes, seq: int, reply: FinishedReply | None = None) -> None:
        """The turn's last frame (``done`` or ``error``); with ``reply``, the reply PostgreSQL did not take."""
        self.add(data, seq)
        if self.ended or self.broken:
            return
        self.ended = True
        self.reply = None if reply is None else orjson.dumps(asdict(reply))
        if not self.due:
            self.due = True
            self.recorder.due(self)


class Tapes:
    """The kept frames of this worker's turns, and the reads of any turn's."""

    def __init__(self, redis: Redis, prefix: str, flush_s: float, retention_s: float, lease_s: float,
                 max_readers: int, instance_id: str) -> None:
        self.redis = redis
        self.instance_id = instance_id  # the value of its turns' live keys
        self.client = ScriptClient.like(redis)
        self.prefix = prefix
        self.flush_s = flush_s
        self.retention_ms = int(retention_s * 1000)
        self.running_ms = int((retention_s + lease_s) * 1000)
        # The live key lapses within two thirds of a lease of its instance's death (renewed every third).
        self.live_ms = max(1, int(lease_s * 2000 / 3))
        self.reader_ms = int(lease_s * 1000)
        self.max_readers = max_readers
        self.pending: list[Tape] = []
        self.open: set[Tape] = set()  # opened and not ended: their keys are renewed
        self.readers: dict[str, str] = {}  # this worker's resumers: reader id -> its turn's readers key
        self.flushes = 0  # pipelines sent (round trips), for the benchmark
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task[None] | None = None

    # -- keys ---------------------------------------------------------------------------------------

    def pointer_key(self, chat_id: uuid.UUID) -> str:
        return f"{self.prefix}t:{{{chat_id}}}"

    def turn_key(self, chat_id: uuid.UUID, message_id: uuid.UUID) -> str:
        return f"{self.prefix}t:{{{chat_id}}}:{message_id}"

    # -- writing ------------------------------------------------------------------------------------

    def tape(self, chat_id: uuid.UUID, message_id: uuid.UUID, owner: Owner, format: str) -> Tape:
        return Tape(self, chat_id, message_id, owner, format)

    def due(self, tape: Tape) -> None:
        self.pending.append(tape)
        if self._timer is None and self._flushing is None:
            self._timer = asyncio.get_running_loop().call_later(self.flush_s, self._flush_now)

    def _flush_now(self) -> None:
        self._timer = None
        self._flushing = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        batch, self.pending = self.pending, []
        try:
            commands: list[bytes] = []
            spans = []
            for tape in batch:
                start = len(commands)
                commands += self._commands(tape)
                spans.append((tape, start, len(commands)))
            self.flushes += 1
            try:
                replies = await self.client.pipeline(commands)
            except (RedisError, OSError):
                logger.warning("keeping turns' events failed; they are no longer resumable",
                               extra={"count": len(batch)}, exc_info=True)
                replies = [ConnectionError()] * len(commands)
            for tape, start, end in spans:
                if any(isinstance(reply, Exception) for reply in replies[start:end]):
                    tape.broken = True
                    self.open.discard(tape)
        finally:
            self._flushing = None
            if self.pending and self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(self.flush_s, self._flush_now)

    def _commands(self, tape: Tape) -> list[bytes]:
        frames, tape.frames, tape.due = tape.frames, [], False
        out = []
        if not tape.opened:
            tape.opened = True
            out += [command("HSET", tape.pointer, "m", str(tape.message_id), "f", tape.format,
                            "o", tape.owner.org_id, "u", tape.owner.user_id),
                    command("PEXPIRE", tape.pointer, self.running_ms)]
            if not tape.ended:
                self.open.add(tape)
                out.append(command("SET", tape.key + ":live", self.instance_id, "PX", self.live_ms))
        fields: list[bytes | str] = ["d", b"".join(frames)]
        if tape.ended:
            fields += ["e", "1"]
            if tape.reply is not None:
                fields += ["r", tape.reply]
        out.append(command("XADD", tape.key, "MAXLEN", "~", MAX_ENTRIES, f"{tape.last}-0", *fields))
        if tape.ended:
            self.open.discard(tape)
            out += [command("DEL", tape.key + ":live"), command("PEXPIRE", tape.key, self.retention_ms),
                    command("PEXPIRE", tape.pointer, self.retention_ms)]
        elif len(out) > 1:
            out.append(command("PEXPIRE", tape.key, self.running_ms))
        return out

    async def renew(self) -> None:
        """Push back the keys of every running turn kept here, and the places of this worker's resumers."""
        commands = []
        for tape in list(self.open):
            commands += [command("SET", tape.key + ":live", self.instance_id, "PX", self.live_ms),
                         command("PEXPIRE", tape.key, self.running_ms),
                         command("PEXPIRE", tape.pointer, self.running_ms)]
        lapse = int(time.time() * 1000) + self.reader_ms
        commands += [command("ZADD", key, "XX", lapse, reader) for reader, key in self.readers.items()]
        if commands:
            await self.client.pipeline(commands)

    async def close(self) -> None:
        """Flush what waits, then close the connection."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flushing is not None:
            await self._flushing
        if self.pending:
            await self._flush()
        await self.client.aclose()

    # -- reading ------------------------------------------------------------------------------------

    async def current(self, chat_id: uuid.UUID, lease_key: str) -> tuple[Current | None, uuid.UUID | None]:
        """The chat's kept turn, and the message id of the turn its lease names (one running now)."""
        pointer, lease = await self.client.pipeline([command("HGETALL", self.pointer_key(chat_id)),
                                                     command("GET", lease_key)])
        for reply in (pointer, lease):
            if isinstance(reply, Exception):
                raise reply
        running = uuid.UUID(lease.split(b" ")[-1].decode()) if lease else None
        found = dict(zip(pointer[::2], pointer[1::2], strict=True))
        if b"m" not in found:
            return None, running
        return Current(uuid.UUID(found[b"m"].decode()), found[b"f"].decode(),
                       Owner(found[b"o"].decode(), found[b"u"].decode())), running

    async def read(self, key: str, after: int, reader: str | None = None) -> tuple[bool, list[Entry]]:
        """Whether a reader's place was had (True without ``reader``), and the entries holding frames past
        number ``after``."""
        commands = [command("XRANGE", key, f"{after + 1}-0", "+")]
        if reader is not None:
            now = int(time.time() * 1000)
            commands.insert(0, command("EVALSHA", _READER.sha, 1, key + ":readers", now, now + self.reader_ms,
                                       self.max_readers, reader, self.running_ms))
        replies = await self.client.pipeline(commands)
        if reader is not None and isinstance(replies[0], Exception):  # a server that has not seen the script
            replies[0] = (await self.client.pipeline([command("EVAL", _READER.source, 1, key + ":readers", now,
                                                               now + self.reader_ms, self.max_readers, reader,
                                                               self.running_ms)]))[0]
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        placed = True
        if reader is not None:
            placed = replies[0] == 1
            if placed:
                self.readers[reader] = key + ":readers"
        return placed, [_entry(raw) for raw in replies[-1]]

    async def follow(self, key: str, after: int, block_s: float) -> list[Entry]:
        """Entries past frame ``after``, waiting up to ``block_s`` for some (on a connection of the pool)."""
        found: Any = await self.redis.xread({key: f"{after}-0"}, block=max(1, int(block_s * 1000)))
        if not found:
            return []
        return [(int(entry_id.split(b"-")[0]), fields) for entry_id, fields in found[0][1]]

    async def alive(self, key: str) -> bool:
        """Whether the turn's instance still holds it (or has kept its end)."""
        return bool(await self.redis.exists(key + ":live"))

    async def leave(self, reader: str) -> None:
        key = self.readers.pop(reader, None)
        if key is not None:
            try:
                await self.client.pipeline([command("ZREM", key, reader)])
            except (RedisError, OSError):
                logger.warning("freeing a reader's place failed; it will lapse", exc_info=True)

    async def end_lost(self, key: str, seq: int, frame: bytes) -> None:
        """End a turn whose instance died with ``frame`` (number ``seq``); a no-op when an end is already kept."""
        await self.client.pipeline([
            command("XADD", key, "NOMKSTREAM", f"{seq}-0", "d", frame, "e", "1"),
            command("PEXPIRE", key, self.retention_ms),
        ])

    async def everything(self, keys: list[str]) -> list[list[Entry]]:
        """All the entries of each turn (for the reply of a turn whose instance is gone)."""
        replies = await self.client.pipeline([command("XRANGE", key, "-", "+") for key in keys])
        return [[] if isinstance(reply, Exception) else [_entry(raw) for raw in reply] for reply in replies]

    async def held(self, keys: list[str]) -> list[str | None]:
        """The instance holding each turn, None for one no instance holds."""
        replies = await self.client.pipeline([command("GET", key + ":live") for key in keys])
        return [reply.decode() if isinstance(reply, bytes) else None for reply in replies]


def _entry(raw: list[Any]) -> Entry:
    entry_id, fields = raw
    return int(entry_id.split(b"-")[0]), dict(zip(fields[::2], fields[1::2], strict=True))


def reply_from(data: bytes) -> FinishedReply:
    """A reply kept with a turn's end (``Tape.end``) as it was to be stored."""
    fields = orjson.loads(data)
    fields["message_id"] = uuid.UUID(fields["message_id"])
    return FinishedReply(**fields)
