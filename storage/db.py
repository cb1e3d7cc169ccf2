"""The worker's PostgreSQL connections: asyncpg connections with JSON codecs, shared through a lean pool."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import asyncpg
import orjson


def _dump_json(value: object) -> str:
    return orjson.dumps(value).decode()


async def _init_connection(conn: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=_dump_json, decoder=orjson.loads, schema="pg_catalog")


class Pool:
    """Up to ``max_size`` connections, each used by one caller at a time.

    asyncpg's own pool returns every connection through a task of its own (``asyncio.shield``) and arms
    an inactivity timer on each return: 50-70 us more of the worker's CPU than a bare connection (SELECT 1
    on uvloop) and one more turn of the event loop per query, twice on the way to a chat turn's first
    token. Here a call takes an idle connection (the most recently used), opens one while below
    ``max_size``, or waits in line, and gives it back at once.
    Nothing is reset on the way back: no query of ours leaves session state behind (no SET, LISTEN, cursor
    or session-level advisory lock; the migrations' lock is taken on a connection of their own). A
    connection that comes back closed is forgotten; one that may be in the middle of an operation (its use
    cancelled or timed out, its socket broken) or inside a transaction is closed.
    """

    def __init__(self, dsn: str, min_size: int, max_size: int, command_timeout: float | None = None) -> None:
        self._dsn = dsn
        self._min_size = min_size
        self._max_size = max_size
        self._command_timeout = command_timeout
        self._idle: list[asyncpg.Connection] = []
        self._size = 0  # connections open or being opened
        self._waiters: collections.deque[asyncio.Future[asyncpg.Connection | None]] = collections.deque()
        self._closed = False

    @property
    def size(self) -> int:
        """Connections open (or being opened), idle or in use."""
        return self._size

    @property
    def in_use(self) -> int:
        """Connections handed out and not yet given back (or being opened)."""
        return self._size - len(self._idle)

    @property
    def spare(self) -> bool:
        """Whether a connection can be had now, without waiting in line: one idle, or room to open one."""
        return bool(self._idle) or self._size < self._max_size

    @property
    def waiting(self) -> int:
        """Callers waiting in line for a connection."""
        return sum(not waiter.done() for waiter in self._waiters)

    async def open(self) -> None:
        connections = [await self._take() for _ in range(self._min_size)]
        for conn in connections:
            self._back(conn, None)

    async def close(self) -> None:
        """Close the idle connections; one in use is closed when it comes back."""
        self._closed = True
        idle, self._idle = self._idle, []
        self._size -= len(idle)
        await asyncio.gather(*(conn.close() for conn in idle), return_exceptions=True)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _connect(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(self._dsn, command_timeout=self._command_timeout)
        try:
            await _init_connection(conn)
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def _take(self) -> asyncpg.Connection:
        first = True
        while True:
            while self._idle:
                conn = self._idle.pop()
                if not conn.is_closed():
                    return conn
                self._size -= 1
            if self._closed:
                raise asyncpg.InterfaceError("the connection pool is closed")
            if self._size < self._max_size:
                self._size += 1
                try:
                    return await self._connect()
                except BaseException:
                    self._size -= 1
                    self._pass_on(None)
                    raise
            handed = await self._wait_turn(first)
            if handed is not None:
                return handed
            first = False  # woken to open a connection, it found the room taken: it keeps its place in line

    async def _wait_turn(self, first: bool) -> asyncpg.Connection | None:
        """Wait in line (at its end, or back at its head) for a connection, or for room to open one (None)."""
        waiter: asyncio.Future[asyncpg.Connection | None] = asyncio.get_running_loop().create_future()
        if first:
            self._waiters.append(waiter)
        else:
            self._waiters.appendleft(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # its turn came as it was cancelled: passed on
                if (given := waiter.result()) is not None:
                    self._back(given, None)
                else:
                    self._pass_on(None)
            raise

    def _back(self, conn: asyncpg.Connection, error: BaseException | None) -> None:
        """``conn`` is given back after a use that raised ``error`` (if any). It is kept unless the use may
        have left it in the middle of an operation (cancelled, timed out, its socket or protocol broken):
        then it is closed."""
        unsafe = error is not None and (not isinstance(error, Exception) or isinstance(error, _UNSAFE))
        if unsafe or self._closed or conn.is_closed() or conn.is_in_transaction():
            self._size -= 1
            if not conn.is_closed():
                conn.terminate()
            self._pass_on(None)
        else:
            self._pass_on(conn)

    def _pass_on(self, conn: asyncpg.Connection | None) -> None:
        """A connection came back (``conn``), or there is room to open one (None): handed to the first caller
        in line, who then cannot be overtaken by one arriving later; with nobody waiting, ``conn`` is idle."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        if conn is not None:
            self._idle.append(conn)

    def acquire(self) -> _Use:
        """``async with pool.acquire() as conn``: one connection for several statements (a transaction)."""
        return _Use(self)

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        async with _Use(self) as conn:
            return await conn.fetch(query, *args)

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        async with _Use(self) as conn:
            return await conn.fetchrow(query, *args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        async with _Use(self) as conn:
            return await conn.fetchval(query, *args)

    async def execute(self, query: str, *args: Any) -> str:
        async with _Use(self) as conn:
            return await conn.execute(query, *args)


# What says PostgreSQL cannot be reached or is going away (refused, reset, shutting down, out of
# connections, our pool closed): an outage for the caller to retry, not a bug.
OUTAGES: tuple[type[Exception], ...] = (
    OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError, asyncpg.InsufficientResourcesError,
)

# What a statement can fail with that is not a bug of ours: PostgreSQL's errors and its outages.
STORE_FAILURES: tuple[type[Exception], ...] = (asyncpg.PostgresError, *OUTAGES)

# What asyncpg raises when a connection may be left mid-operation; a PostgreSQL error leaves it ready.
_UNSAFE = (TimeoutError, OSError, asyncpg.InterfaceError)


class _Use:
    __slots__ = ("conn", "pool")

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def __aenter__(self) -> asyncpg.Connection:
        self.conn: asyncpg.Connection = await self.pool._take()
        return self.conn

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        self.pool._back(self.conn, error)


async def create_pool(dsn: str, min_size: int = 2, max_size: int = 20) -> Pool:
    pool = Pool(dsn, min_size, max_size, command_timeout=30)
    await pool.open()
    return pool
