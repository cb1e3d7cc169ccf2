"""A counting TCP relay in front of Redis: a gateway started with its Redis URL pointing here has every
burst of bytes it writes to Redis counted on the way, from outside the gateway.

What is counted (``Tally``): reads on the relay's gateway side, and their bytes. A pipeline the gateway
writes at once is one read, a burst longer than one read's buffer (256 KiB on uvloop) is more, and writes
that meet in the socket before the relay reads them are one, as Redis too would read them at once. So a
read is a round trip as the network and Redis see it. Replies are relayed, not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import cast
from urllib.parse import parse_qs, urlsplit


@dataclass(slots=True)
class Tally:
    """What the gateway sent through the relay so far."""

    reads: int = 0
    bytes: int = 0
    connections: int = 0

    def rates(self, earlier: Tally, seconds: float) -> dict[str, float]:
        """Reads and KiB a second since ``earlier``, a copy of this tally taken ``seconds`` ago."""
        return {"round_trips_per_s": (self.reads - earlier.reads) / seconds,
                "kib_per_s": (self.bytes - earlier.bytes) / 1024 / seconds}

    def copy(self) -> Tally:
        return replace(self)


def proxied_url(redis_url: str, port: int) -> str:
    """``redis_url`` with its host and port replaced by the relay's, its credentials and database kept (a
    ``unix://`` socket's URL becomes a TCP one, its ``?db=`` the path's)."""
    parts = urlsplit(redis_url)
    if parts.scheme == "unix":
        db = parse_qs(parts.query).get("db", ["0"])[0]
        return f"redis://127.0.0.1:{port}/{db}"
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@127.0.0.1:{port}" if credentials else f"127.0.0.1:{port}"
    return parts._replace(netloc=netloc).geturl()


class _End(asyncio.Protocol):
    """One end of a relayed connection: what it reads goes to its peer's transport (held until the peer
    connects), counted when it is the gateway's end; a full peer pauses its reading."""

    def __init__(self, tally: Tally | None) -> None:
        self.tally = tally
        self.transport: asyncio.Transport | None = None
        self.peer: _End | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.tally is not None:
            self.tally.reads += 1
            self.tally.bytes += len(data)
        if self.peer is None or self.peer.transport is None:
            self.early.append(data)
        else:
            self.peer.transport.write(data)

    def link(self, peer: _End) -> None:
        self.peer, peer.peer = peer, self
        assert peer.transport is not None
        for data in self.early:
            peer.transport.write(data)
        self.early.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class CountingProxy:
    """A relay listening on 127.0.0.1 in front of the Redis of ``redis_url``; ``url`` is what the gateway
    is given instead."""

    def __init__(self, redis_url: str) -> None:
        parts = urlsplit(redis_url)
        self.socket_path = parts.path if parts.scheme == "unix" else None  # the embedded Redis's
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self.redis_url = redis_url
        self.tally = Tally()
        self.url = ""
        self._server: asyncio.Server | None = None
        self._connecting: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, "127.0.0.1", 0)
        self.url = proxied_url(self.redis_url, self._server.sockets[0].getsockname()[1])

    def _accept(self) -> _End:
        self.tally.connections += 1
        gateway_end = _End(self.tally)
        task = asyncio.ensure_future(self._connect(gateway_end))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)
        return gateway_end

    async def _connect(self, gateway_end: _End) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.socket_path is not None:
                _, redis_end = await loop.create_unix_connection(lambda: _End(None), self.socket_path)
            else:
                _, redis_end = await loop.create_connection(lambda: _End(None), *self.upstream)
        except OSError:
            if gateway_end.transport is not None:
                gateway_end.transport.close()
            return
        if gateway_end.transport is None:  # the gateway hung up meanwhile
            assert redis_end.transport is not None
            redis_end.transport.close()
            return
        gateway_end.link(redis_end)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connecting):
            task.cancel()


@contextlib.asynccontextmanager
async def counting_proxy(redis_url: str) -> AsyncIterator[CountingProxy]:
    proxy = CountingProxy(redis_url)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()
