"""The HTTP/1.1 client the vendor adapters stream through: one pool of keep-alive connections per adapter.

Each vendor's SDK still decides what a request looks like (base URL, key, the headers it sends, see
``sdk_headers``); the bytes go through here, parsed by httptools (the parser uvicorn serves with). A call
is read two ways: pulled batch by batch (``async for``) until its first token, then, for a stream, relayed:
every network read is decoded and handed to a sink from the connection's own callback, with no task step
per read (docs/performance.md has the measurements that chose this over aiohttp and over the SDKs).

Errors leave as our own: a status of 400 or more as ``status_failure`` (the vendor's text left out), no
byte for ``idle_timeout_s`` as ``ProviderTimeout`` (checked by one timer per pool, so a stall ends between
one and one and a quarter idle timeouts), anything else on the wire as ``ProviderConnectionError``.

Past 400 lines because its three parts (a connection, the pool of them, and a call's state from request
to last event) share one callback path whose every branch is the hot path; apart, each would reach into
the others' state.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any, cast
from urllib.parse import urlsplit

import httptools
import orjson

from providers.base import (
    BatchSink,
    ProviderConnectionError,
    ProviderError,
    ProviderProtocolError,
    ProviderTimeout,
    StreamBatch,
    UpstreamConfig,
    status_failure,
)
from providers.proxy import Proxy, proxy_for, tunnel
from providers.sse import SSEDecoder, SSEEvent, StreamReader

logger = logging.getLogger("providers.http")

# Headers the client owns: the body's length and the connection are ours to state; we cannot decompress.
_OWN_HEADERS = frozenset({"host", "content-length", "connection", "transfer-encoding", "accept-encoding"})
# How much of an error answer is kept to find the vendor's error kind in.
MAX_ERROR_BODY = 64 << 10
# How long a pooled connection may sit unused before it is closed (vendors close theirs after a while).
KEEPALIVE_S = 15.0
# Idle-timeout checks per timeout: a stall is noticed after 4 to 5 quarters of it.
_TICKS = 4


def sdk_headers(client: Any) -> dict[str, str]:
    """The headers an official SDK client sends on every request: its identity, version pins and key."""
    headers = {**client.default_headers, **client.auth_headers}
    return {name: value for name, value in headers.items() if isinstance(value, str)}


def json_or_none(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def request_head(
    url: str, length: int, headers: Mapping[str, str], route: Callable[[str, str], Proxy | None] = proxy_for
) -> tuple[tuple[str, str, int], bytes]:
    """The pool key (scheme, host, port) and the request's head for a JSON POST of ``length`` bytes; for a
    plain http URL behind a proxy (``route``: ``HTTP_PROXY``), in the absolute form a proxy takes, with its
    credentials."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ProviderConnectionError(f"Cannot call {url!r}: not an http(s) URL")
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.netloc.rpartition("@")[2]
    proxy = None if https else route("http", parts.hostname)
    if proxy is not None:
        target = f"http://{host}{target}"
    lines = [f"POST {target} HTTP/1.1", f"Host: {host}", f"Content-Length: {length}"]
    if proxy is not None and proxy.authorization:
        lines.append(f"Proxy-Authorization: {proxy.authorization}")
    if not any(name.lower() == "content-type" for name in headers):
        lines.append("Content-Type: application/json")
    for name, value in headers.items():
        if name.lower() in _OWN_HEADERS:
            continue
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ProviderConnectionError(f"The header {name!r} holds a line break")
        lines.append(f"{name}: {value}")
    return (parts.scheme, parts.hostname, port), ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class Upstream:
    """A vendor's connection pool: ``stream`` starts a call that posts a JSON body and reads the answer."""

    def __init__(self, vendor: str, config: UpstreamConfig) -> None:
        self.vendor = vendor
        self.config = config
        self.active: set[UpstreamCall] = set()  # calls waiting on the vendor, for the idle check
        self._idle: dict[tuple[str, str, int], list[tuple[float, _Connection]]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._slots: asyncio.Semaphore | None = None
        self._tls: ssl.SSLContext | None = None
        self._routes: dict[tuple[str, str], Proxy | None] = {}

    def route(self, scheme: str, host: str) -> Proxy | None:
        """The proxy to ``host`` (``proxy_for``), read from the environment once per host: reading it costs
        more than the rest of a request's head (37 us)."""
        key = (scheme, host)
        if key not in self._routes:
            self._routes[key] = proxy_for(scheme, host)
        return self._routes[key]

    def stream(self, url: str, body: bytes, headers: Mapping[str, str], reader: StreamReader) -> UpstreamCall:
        return UpstreamCall(self, url, body, headers, reader)

    async def connect(self, key: tuple[str, str, int]) -> _Connection:
        """A pooled connection to ``key`` when one is open, else a new one (within the connect timeout)."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.config.max_connections)
        await self._slots.acquire()
        try:
            idle = self._idle.get(key)
            while idle:
                _, connection = idle.pop()
                if connection.is_open():
                    return connection
            return await self._open(key)
        except BaseException:
            self._slots.release()
            raise

    async def _open(self, key: tuple[str, str, int]) -> _Connection:
        scheme, host, port = key
        tls = None
        if scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        loop = asyncio.get_running_loop()
        proxy = self.route(scheme, host)
        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                if proxy is None:
                    _, connection = await loop.create_connection(
                        lambda: _Connection(self, key), host, port, ssl=tls, server_hostname=host if tls else None)
                elif tls is not None:
                    connection = _Connection(self, key)
                    await tunnel(proxy, host, port, tls, connection)
                else:  # a plain http vendor: the request itself goes to the proxy (see ``request_head``)
                    _, connection = await loop.create_connection(lambda: _Connection(self, key), proxy.host, proxy.port)
        except TimeoutError:
            raise ProviderTimeout(f"Connecting to {self.vendor} timed out") from None
        except OSError:
            raise ProviderConnectionError(f"The connection to {self.vendor} failed") from None
        return connection

    def done_with(self, connection: _Connection, reusable: bool) -> None:
        """A call is over with ``connection``: back to the pool, or closed."""
        assert self._slots is not None
        self._slots.release()
        if reusable and connection.is_open():
            assert connection.transport is not None
            connection.transport.resume_reading()  # a call may have paused it; the pool watches for a close
            self._idle.setdefault(connection.key, []).append((time.monotonic(), connection))
            self.watch()
        else:
            connection.abort()

    def forget(self, connection: _Connection) -> None:
        """A pooled connection was closed by the vendor."""
        idle = self._idle.get(connection.key)
        if idle:
            idle[:] = [entry for entry in idle if entry[1] is not connection]

    def watch(self) -> None:
        """Keep the idle check running while a call waits on the vendor or a connection sits in the pool."""
        if self._timer is None:
            tick = min(self.config.idle_timeout_s, KEEPALIVE_S) / _TICKS
            self._timer = asyncio.get_running_loop().call_later(tick, self._tick)

    def _tick(self) -> None:
        self._timer = None
        for call in list(self.active):
            call.check_idle()
        expired = time.monotonic() - KEEPALIVE_S
        for key, idle in list(self._idle.items()):
            for _, connection in [entry for entry in idle if entry[0] < expired]:
                connection.abort()
            idle[:] = [entry for entry in idle if entry[0] >= expired]
            if not idle:
                del self._idle[key]
        if self.active or self._idle:
            self.watch()

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for call in list(self.active):
            call.close()
        for idle in self._idle.values():
            for _, connection in idle:
                connection.abort()
        self._idle.clear()


class _Connection(asyncio.Protocol):
    """One keep-alive connection; while a call owns it, every read goes to that call's parser."""

    __slots__ = ("call", "key", "transport", "upstream")

    def __init__(self, upstream: Upstream, key: tuple[str, str, int]) -> None:
        self.upstream = upstream
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.call: UpstreamCall | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses

    def is_open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        call = self.call
        if call is None:  # bytes nobody asked for: the connection can't be trusted for the next call
            self.abort()
            return
        call.feed(data)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        call, self.call = self.call, None
        if call is not None:
            call.lost()
        else:
            self.upstream.forget(self)

    def pause_writing(self) -> None:
        pass  # a request body is small; nothing waits to write more

    def resume_writing(self) -> None:
        pass


class UpstreamCall:
    """One request and its answer's event batches: an async iterator of batches that can be turned into a
    relay (``relay``) once the first has been read. As an iterator it reads a batch ahead of its consumer
    and then pauses the connection; a relay reads as the client takes what it writes. Closing it closes
    its connection at once unless the answer was read to its end, in which case the connection goes back
    to the pool."""

    __slots__ = (
        "body",
        "connection",
        "decoder",
        "error_body",
        "error_headers",
        "failure",
        "framed",
        "headers",
        "held",
        "held_end",
        "over",
        "parser",
        "paused",
        "quiet",
        "reader",
        "reads",
        "ready",
        "seen",
        "sink",
        "started",
        "status",
        "upstream",
        "url",
        "waiter",
    )

    def __init__(
        self, upstream: Upstream, url: str, body: bytes, headers: Mapping[str, str], reader: StreamReader
    ) -> None:
        self.upstream = upstream
        self.url = url
        self.body: bytes | None = body
        self.headers = headers
        self.reader = reader
        self.decoder = SSEDecoder()
        self.connection: _Connection | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.status = 0
        self.framed = False  # the answer states its length or is chunked (else it ends with the connection)
        self.error_headers: dict[str, str] = {}
        self.error_body = bytearray()
        self.ready: list[StreamBatch] = []
        # Events read while a batch waits for its consumer, kept unread until it asks for more (see
        # ``_read``), and how the answer ended behind them (None: not yet; else keep-alive).
        self.held: list[SSEEvent] = []
        self.held_end: bool | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.sink: BatchSink | None = None
        self.failure: ProviderError | None = None
        self.over = False  # no more events will come: complete, failed or closed
        self.started = False
        self.reads = self.seen = self.quiet = 0
        self.paused = False  # reading waits on the consumer: a stall is then not the vendor's

    # -- the consumer's side ------------------------------------------------------------------------

    def __aiter__(self) -> UpstreamCall:
        return self

    async def __anext__(self) -> StreamBatch:
        if not self.started:
            self.started = True
            try:
                await self._start()
            except BaseException:
                self.close()
                raise
        if not self.ready and self.held:
            self._read_held()
        while not self.ready:
            if self.over:
                if self.failure is not None:
                    raise self.failure
                raise StopAsyncIteration
            if self.paused:
                self.resume()
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            except asyncio.CancelledError:
                self.close()
                raise
            finally:
                self.waiter = None
        return self.ready.pop(0)

    def relay(self, sink: BatchSink) -> None:
        """From now on hand every batch to ``sink`` as it is read, then call its ``ended`` once."""
        assert self.started, "relay a call once its first batch has been read"
        self.sink = sink
        ready, self.ready = self.ready, []
        for batch in ready:
            self._emit(batch)
        if self.held:
            self._read_held()
        if self.over and self.sink is not None:
            self.sink.ended(self.failure)
            self.sink = None
        elif self.paused:
            self.resume()

    def pause(self) -> None:
        self.paused = True
        if self.connection is not None and self.connection.transport is not None:
            self.connection.transport.pause_reading()

    def resume(self) -> None:
        self.paused = False
        if self.connection is not None and self.connection.transport is not None:
            self.connection.transport.resume_reading()

    def close(self) -> None:
        """Stop at once: no more batches, and the connection closed (or pooled, when read to its end)."""
        self.sink = None
        self.held = []
        if not self.over:
            self.over = True
            self._wake()
        self._release(reusable=False)

    async def aclose(self) -> None:
        self.close()

    # -- the connection's side ----------------------------------------------------------------------

    async def _start(self) -> None:
        upstream = self.upstream
        assert self.body is not None
        key, head = request_head(self.url, len(self.body), self.headers, self.upstream.route)
        connection = await upstream.connect(key)
        assert connection.transport is not None
        self.connection, connection.call = connection, self
        self.parser = httptools.HttpResponseParser(self)
        connection.transport.write(head + self.body)
        self.body = None  # a stream can outlive its request by minutes; its body need not
        upstream.active.add(self)
        upstream.watch()

    def feed(self, data: bytes) -> None:
        self.reads += 1
        assert self.parser is not None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail(ProviderProtocolError(f"{self.upstream.vendor} sent a malformed HTTP answer"))

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered in (b"content-length", b"transfer-encoding"):
            self.framed = True
        if len(self.error_headers) < 64:
            self.error_headers[lowered.decode("latin-1")] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        self.status = self.parser.get_status_code()
        if self.status < 400:
            self.error_headers = {}

    def on_body(self, body: bytes) -> None:
        if self.status >= 400:
            if len(self.error_body) < MAX_ERROR_BODY:
                self.error_body += body[: MAX_ERROR_BODY - len(self.error_body)]
            return
        if self.over:
            return
        try:
            events = self.decoder.feed(body)
        except Exception as error:
            self._fail(self._as_failure(error))
            return
        if self.held or (self.ready and self.sink is None):
            self.held += events  # split into events, not read: a batch waits for its consumer
            return
        self._read(events)

    def _read(self, events: list[SSEEvent]) -> None:
        """``events`` through the vendor's reader, as one batch. Before the relay, once a batch has something
        for its consumer (the first token, while the turn's message is being stored), the rest is held
        unread until the consumer asks for more: an answer that arrives at once is not worked through in
        the first token's way."""
        batch: StreamBatch = []
        holding = self.sink is None  # not relaying yet
        try:
            for n, (name, data) in enumerate(events):
                if self.reader.event(name, data, batch):
                    self._emit(batch)
                    self._end(None)
                    return
                if holding and batch and n + 1 < len(events):
                    self.held = events[n + 1:]
                    break
        except Exception as error:  # deltas read before a failure still reach the client
            self._emit(batch)
            self._end(self._as_failure(error))
            return
        self._emit(batch)

    def on_message_complete(self) -> None:
        assert self.parser is not None
        keep_alive = self.parser.should_keep_alive()
        if self.held:
            self.held_end = keep_alive  # the answer's end waits behind what is held
            return
        self._complete(keep_alive)

    def _complete(self, keep_alive: bool) -> None:
        if self.status >= 400:
            self._end(status_failure(self.upstream.vendor, self.status, json_or_none(bytes(self.error_body)),
                                     self.error_headers))
        elif not self.over:
            self._bytes_ended()
        self._release(reusable=keep_alive)

    def lost(self) -> None:
        """The connection closed under the call (its slot in the pool is freed here too)."""
        if self.held:
            self._read_held(every=True)
        if not self.over:
            if self.status and self.status < 400 and not self.framed:
                self._bytes_ended()  # an answer without a length ends with its connection
            else:
                self._end(ProviderConnectionError(f"The connection to {self.upstream.vendor} failed"))
        self._release(reusable=False)

    def check_idle(self) -> None:
        if self.reads != self.seen or self.paused:
            self.seen, self.quiet = self.reads, 0
            return
        self.quiet += 1
        if self.quiet > _TICKS:
            self._end(ProviderTimeout(f"{self.upstream.vendor} timed out"))
            self._release(reusable=False)

    # -- internals ----------------------------------------------------------------------------------

    def _fail(self, failure: ProviderError) -> None:
        """End with ``failure``, after the events held before it (deltas read before a failure still reach
        the client)."""
        if self.held:
            self._read_held(every=True)
        self._end(failure)

    def _read_held(self, every: bool = False) -> None:
        """Read the events held back (unless ``every``, until a batch waits for its consumer again), then
        end the answer if it ended behind them."""
        while self.held and not self.over and (every or self.sink is not None or not self.ready):
            held, self.held = self.held, []
            self._read(held)
        if self.over:
            self.held = []
        if not self.held and self.held_end is not None:
            keep_alive, self.held_end = self.held_end, None
            self._complete(keep_alive)

    def _bytes_ended(self) -> None:
        batch: StreamBatch = []
        try:
            for name, data in self.decoder.close():
                if self.reader.event(name, data, batch):
                    break
            else:
                self.reader.end(batch)
        except Exception as error:
            self._emit(batch)
            self._end(self._as_failure(error))
            return
        self._emit(batch)
        self._end(None)

    def _as_failure(self, error: Exception) -> ProviderError:
        if isinstance(error, ProviderError):
            return error
        logger.warning("a %s frame could not be read", self.upstream.vendor, exc_info=True)
        return ProviderProtocolError(f"{self.upstream.vendor} sent a frame that could not be read")

    def _emit(self, batch: StreamBatch) -> None:
        """A batch read: to the sink when relaying (a sink that fails ends the relay), else to the reader."""
        if not batch:
            return
        sink = self.sink
        if sink is None:
            # Read on demand: a batch ahead of the consumer, no more. Until a stream's first token has
            # gone out, the rest of an answer that arrives at once is not decoded in its way.
            self.ready.append(batch)
            if not self.paused:
                self.pause()
            self._wake()
            return
        try:
            sink.deliver(batch)
        except Exception:
            logger.exception("relaying a %s batch failed", self.upstream.vendor)
            self.close()
            sink.ended(ProviderError("The gateway failed to relay the stream"))

    def _end(self, failure: ProviderError | None) -> None:
        if self.over:
            return
        self.over, self.failure = True, failure
        self.upstream.active.discard(self)
        if self.sink is not None:
            sink, self.sink = self.sink, None
            sink.ended(failure)
        else:
            self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _release(self, reusable: bool) -> None:
        self.upstream.active.discard(self)
        connection, self.connection = self.connection, None
        if connection is None:
            return
        self.parser = None  # it holds this call's methods: a cycle that only a full collection would free
        connection.call = None
        # Only an answer read to its end, with no failure, leaves the connection fit for another call.
        self.upstream.done_with(connection, reusable and self.failure is None and self.over)
