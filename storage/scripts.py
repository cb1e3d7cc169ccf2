"""Redis over one pipelined RESP2 connection, replies matched to calls in order, no pool: the quota
scripts' own, and another for the kept events of resumable turns (storage/tapes.py).

redis-py spends about 140 us of CPU on each script call (its pool, timeouts, argument encoding, RESP3
reader), and every stream makes two (admission and settlement): 190 us of CPU a call through redis-py,
50 us through this connection, on this machine. Everything else (the limits cache, renewals, the stop
channel, reports) stays on redis-py, whose client this one is made ``like``: same server, database and
credentials.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from collections.abc import Sequence
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection
from redis.exceptions import ConnectionError, NoScriptError, ResponseError

CONNECT_TIMEOUT_S = 5.0


class Script:
    """A Lua script, called by its digest; sent whole only to a server that does not know it yet."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source).hexdigest().encode()


def command(*parts: bytes | str | int | float) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part if type(part) is bytes else str(part).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def parse_reply(data: bytes | bytearray, start: int) -> tuple[Any, int] | None:
    """One RESP2 reply from ``data`` at ``start``, and where the next begins; None while incomplete.
    An error reply is returned as its exception (inside an array too), not raised."""
    end = data.find(b"\r\n", start)
    if end < 0:
        return None
    kind, line, after = data[start], data[start + 1:end], end + 2
    if kind == 0x24:  # $ bulk string
        size = int(line)
        if size < 0:
            return None, after
        if len(data) < after + size + 2:
            return None
        return bytes(data[after:after + size]), after + size + 2
    if kind == 0x3A:  # : integer
        return int(line), after
    if kind == 0x2A:  # * array
        count = int(line)
        if count < 0:
            return None, after
        items = []
        for _ in range(count):
            parsed = parse_reply(data, after)
            if parsed is None:
                return None
            item, after = parsed
            items.append(item)
        return items, after
    if kind == 0x2B:  # + simple string
        return bytes(line), after
    if kind == 0x2D:  # - error
        message = bytes(line).decode(errors="replace")
        return (NoScriptError if message.startswith("NOSCRIPT") else ResponseError)(message), after
    raise ConnectionError(f"Redis sent a reply of unknown type {chr(kind)!r}")


class _Replies:
    """A pipeline's replies, gathered into one future: an error reply kept as its exception, in its place."""

    __slots__ = ("count", "future", "values")

    def __init__(self, future: asyncio.Future[list[Any]], count: int) -> None:
        self.future, self.count = future, count
        self.values: list[Any] = []

    def done(self) -> bool:
        return self.future.done()

    def set_exception(self, error: BaseException) -> None:
        self.future.set_exception(error)

    def take(self, value: Any) -> None:
        self.values.append(value)
        if len(self.values) == self.count and not self.future.done():
            self.future.set_result(self.values)


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        # What waits for replies, in order: a call's future, or a pipeline's ``_Replies`` (one per reply).
        self.pending: deque[asyncio.Future[Any] | _Replies] = deque()
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def send(self, data: bytes) -> asyncio.Future[Any]:
        assert self.transport is not None
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending.append(reply)
        self.transport.write(data)
        return reply

    def send_many(self, data: bytes, count: int) -> asyncio.Future[list[Any]]:
        assert self.transport is not None
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        if not count:
            future.set_result([])
            return future
        replies = _Replies(future, count)
        self.pending.extend([replies] * count)
        self.transport.write(data)
        return future

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        start = 0
        try:
            while self.pending and (parsed := parse_reply(buffer, start)) is not None:
                value, start = parsed
                reply = self.pending.popleft()
                if isinstance(reply, _Replies):
                    reply.take(value)
                elif not reply.done():  # its caller may have been cancelled; the reply is still consumed
                    if isinstance(value, ResponseError):
                        reply.set_exception(value)
                    else:
                        reply.set_result(value)
        except (ValueError, ConnectionError):
            self.abort()
            return
        del buffer[:start]

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        while self.pending:
            reply = self.pending.popleft()
            if not reply.done():
                reply.set_exception(ConnectionError("The connection to Redis was lost"))


class ScriptClient:
    """Runs Lua scripts over one connection, opened on first use and again after it is lost."""

    def __init__(self, host: str | None, port: int, path: str | None, db: int, username: str | None,
                 password: str | None, tls: ssl.SSLContext | None) -> None:
        self.host, self.port, self.path, self.tls = host, port, path, tls
        self.setup: list[bytes] = []
        if password:
            self.setup.append(command("AUTH", username, password) if username else command("AUTH", password))
        if db:
            self.setup.append(command("SELECT", db))
        self._connection: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None

    @classmethod
    def like(cls, redis: Redis) -> ScriptClient:
        """A client of the server, database and credentials of ``redis``'s connection pool."""
        pool = redis.connection_pool
        kwargs = pool.connection_kwargs
        tls = None
        if issubclass(pool.connection_class, SSLConnection):
            tls = ssl.create_default_context(cafile=kwargs.get("ssl_ca_certs"))
            if kwargs.get("ssl_cert_reqs") in ("none", ssl.CERT_NONE):
                tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
        return cls(kwargs.get("host"), kwargs.get("port", 6379), kwargs.get("path"), int(kwargs.get("db") or 0),
                   kwargs.get("username"), kwargs.get("password"), tls)

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[str | int | float]) -> Any:
        """The script's reply; raises redis-py's exceptions (ResponseError, ConnectionError) or OSError."""
        connection = self._connection
        if connection is None or not connection.usable:
            connection = await self._connect()
        try:
            return await connection.send(command(b"EVALSHA", script.sha, len(keys), *keys, *args))
        except NoScriptError:  # a server that restarted or flushed its scripts: EVAL caches it again
            if not connection.usable:
                raise ConnectionError("The connection to Redis was lost") from None
            return await connection.send(command(b"EVAL", script.source, len(keys), *keys, *args))

    async def pipeline(self, commands: Sequence[bytes]) -> list[Any]:
        """The replies to ``commands`` (each made by ``command``), sent in one write; an error reply is
        returned as its exception, in its place. Raises ConnectionError or OSError when Redis is away."""
        connection = self._connection
        if connection is None or not connection.usable:
            connection = await self._connect()
        return await connection.send_many(b"".join(commands), len(commands))

    async def _connect(self) -> _Connection:
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._open())
        return await asyncio.shield(self._connecting)

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            if self.path:
                _, connection = await loop.create_unix_connection(_Connection, self.path)
            else:
                assert self.host is not None
                _, connection = await loop.create_connection(
                    _Connection, self.host, self.port, ssl=self.tls, server_hostname=self.host if self.tls else None)
            try:
                for reply in [connection.send(step) for step in self.setup]:
                    await reply
            except BaseException:
                connection.abort()
                raise
        self._connection = connection
        return connection

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and connection.transport is not None:
            connection.transport.close()
