"""A load generator for any Streamgate (or any OpenAI-format server): real HTTP, real SSE parsing.

``gateway loadtest URL --concurrency 50 --duration 10`` keeps that many streams open in a closed loop and
prints streams/s, tokens/s, time to first token and stalls (``--json``: as one JSON object). On a terminal
it shows its progress on stderr once a second. The benchmark uses the same code.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TextIO, cast
from urllib.parse import urlsplit

import orjson
import uvloop

from providers.sse import SSEDecoder

_TOKEN_FRAME = b'"delta":{"content":'


@dataclass(slots=True)
class StreamResult:
    status: int
    started: float
    ttft_s: float | None = None
    duration_s: float = 0.0
    tokens: int = 0
    stalls: int = 0  # gaps between tokens longer than the stall threshold
    gaps: int = 0


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int
    path: str
    headers: dict[str, str]

    @classmethod
    def of(cls, url: str, token: str | None) -> Target:
        parts = urlsplit(url)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return cls(parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/", headers)


def request_bytes(target: Target, path: str, body: dict[str, object]) -> bytes:
    payload = orjson.dumps(body)
    head = "".join(f"{k}: {v}\r\n" for k, v in target.headers.items())
    return (f"POST {path} HTTP/1.0\r\nHost: {target.host}\r\nContent-Type: application/json\r\n{head}"
            f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload


def get_request(target: Target, path: str, headers: dict[str, str]) -> bytes:
    head = "".join(f"{k}: {v}\r\n" for k, v in {**target.headers, **headers}.items())
    return f"GET {path} HTTP/1.0\r\nHost: {target.host}\r\n{head}\r\n".encode()


class Dechunker:
    """Undoes HTTP/1.1 chunked transfer coding, incrementally (servers use it for streams)."""

    def __init__(self) -> None:
        self.buffer = b""
        self.left = 0  # bytes of the current chunk still to come, then its CRLF

    def feed(self, data: bytes) -> bytes:
        self.buffer += data
        out = bytearray()
        while self.buffer:
            if self.left == 0:
                end = self.buffer.find(b"\r\n")
                if end < 0:
                    break
                size = int(self.buffer[:end].split(b";")[0] or b"0", 16)
                self.buffer = self.buffer[end + 2:]
                if size == 0:
                    self.buffer = b""
                    break
                self.left = size + 2
            take = self.buffer[: self.left]
            self.buffer = self.buffer[len(take):]
            self.left -= len(take)
            out += take[: max(0, len(take) - max(0, 2 - self.left))] if self.left < 2 else take
        return bytes(out)


def is_token(name: bytes | None, data: bytes) -> bool:
    """A streamed delta: our chat stream's ``delta`` or ``reasoning`` event, or an OpenAI chunk with content."""
    return name in (b"delta", b"reasoning") or _TOKEN_FRAME in data


async def one_stream(
    target: Target, request: bytes, stall_after_s: float | None = None,
    on_first_token: Callable[[asyncio.StreamWriter], Awaitable[bool]] | None = None,
    sink: list[StreamResult] | None = None,
) -> StreamResult:
    """Send one request and read its SSE answer to the end (or until ``on_first_token`` says to hang up).

    With ``sink``, the result is put there as soon as the answer starts, so a stream cancelled by its
    caller still reports what it saw.
    """
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(target.host, target.port)
    try:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        result = StreamResult(int(head[9:12]), started)
        if sink is not None:
            sink.append(result)
        decoder, last = SSEDecoder(), 0.0
        dechunk = Dechunker().feed if b"transfer-encoding: chunked" in head.lower() else None
        while chunk := await reader.read(65536):
            now = time.perf_counter()
            for name, data in decoder.feed(dechunk(chunk) if dechunk else chunk):
                if not is_token(name, data):
                    continue
                result.tokens += 1
                if result.ttft_s is None:
                    result.ttft_s = now - started
                    if on_first_token is not None and await on_first_token(writer):
                        result.duration_s = time.perf_counter() - started
                        return result
                elif stall_after_s is not None and now - last > stall_after_s:
                    result.stalls += 1
                result.gaps += result.tokens > 1
                last = now
        result.duration_s = time.perf_counter() - started
        return result
    finally:
        writer.close()


class StreamCounter(asyncio.Protocol):
    """A lean client for many long streams: counts token frames and the gaps between them from the
    transport's callback, with no task step or SSE decoding per read (the capacity and memory scenarios
    hold thousands of streams, and the harness must not be what stalls first)."""

    _MARKERS = (b"event: delta", _TOKEN_FRAME)

    def __init__(self, request: bytes, stall_after_s: float | None, sink: list[StreamResult],
                 done: asyncio.Future[None]) -> None:
        self.request = request
        self.stall_after_s = stall_after_s if stall_after_s is not None else float("inf")
        self.sink = sink
        self.done = done
        self.started = time.perf_counter()
        self.result: StreamResult | None = None
        self.head = b""
        self.carry = [b""] * len(self._MARKERS)  # each marker's last bytes, for one split across reads
        self.last = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        result = self.result
        if result is None:
            self.head += data
            head, sep, data = self.head.partition(b"\r\n\r\n")
            if not sep:
                return
            result = self.result = StreamResult(int(head[9:12]), self.started)
            self.sink.append(result)
        count = 0
        for n, marker in enumerate(self._MARKERS):
            joined = self.carry[n] + data
            count += joined.count(marker)
            self.carry[n] = joined[1 - len(marker):]
        if not count:
            return
        result.tokens += count
        if result.ttft_s is None:
            result.ttft_s = now - self.started
        elif now - self.last > self.stall_after_s:
            result.stalls += 1
        result.gaps += count if result.tokens > count else count - 1
        self.last = now

    def connection_lost(self, exc: Exception | None) -> None:
        if self.result is not None:
            self.result.duration_s = time.perf_counter() - self.started
        if not self.done.done():
            self.done.set_result(None)


async def counted_stream(target: Target, request: bytes, stall_after_s: float | None,
                         sink: list[StreamResult]) -> None:
    """One stream read by a ``StreamCounter`` until the server ends it or the caller cancels."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    transport, _ = await loop.create_connection(
        lambda: StreamCounter(request, stall_after_s, sink, done), target.host, target.port)
    try:
        await done
    finally:
        transport.close()


class FirstBodyByte(asyncio.Protocol):
    """Times a request from its sending to the first byte of its answer's body (its content, past a chunk's
    size line), in the transport's callback (no task step between the read and the clock), then hangs up.
    ``answer`` gets the status, the body's first read and the seconds; an answer other than 200 ends at its
    head, a connection closed first with status 0."""

    def __init__(self, request: bytes, answer: asyncio.Future[tuple[int, bytes, float]]) -> None:
        self.request = request
        self.answer = answer
        self.head = b""
        self.status = 0
        self.dechunk: Callable[[bytes], bytes] | None = None
        self.started = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.started = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if not self.status:
            self.head += data
            head, sep, data = self.head.partition(b"\r\n\r\n")
            if not sep:
                return
            self.status = int(head[9:12])
            if b"transfer-encoding: chunked" in head.lower():
                self.dechunk = Dechunker().feed
        body = self.dechunk(data) if self.dechunk is not None else data
        if (body or self.status != 200) and not self.answer.done():
            self.answer.set_result((self.status, body, now - self.started))
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_result((0, b"", time.perf_counter() - self.started))


async def first_body_byte(target: Target, request: bytes) -> tuple[int, bytes, float]:
    """``request`` sent on a new connection, timed from its sending (once connected) to its answer's first
    body byte (see ``FirstBodyByte``)."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[tuple[int, bytes, float]] = loop.create_future()
    transport, _ = await loop.create_connection(lambda: FirstBodyByte(request, answer), target.host, target.port)
    try:
        return await answer
    finally:
        transport.close()


@dataclass
class LoadReport:
    results: list[StreamResult] = field(default_factory=list)
    errors: int = 0
    elapsed_s: float = 0.0

    def summary(self) -> dict[str, float]:
        ok = [r for r in self.results if r.status == 200]
        ttfts = sorted(r.ttft_s for r in ok if r.ttft_s is not None)
        gaps = sum(r.gaps for r in ok)
        return {
            "streams": len(ok), "errors": self.errors + len(self.results) - len(ok),
            "streams_per_s": len(ok) / self.elapsed_s if self.elapsed_s else 0.0,
            "tokens_per_s": sum(r.tokens for r in ok) / self.elapsed_s if self.elapsed_s else 0.0,
            "ttft_p50_ms": percentile(ttfts, 50) * 1000, "ttft_p99_ms": percentile(ttfts, 99) * 1000,
            "stall_fraction": sum(r.stalls for r in ok) / gaps if gaps else 0.0,
        }


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, round(pct) - 1))]


async def closed_loop(
    concurrency: int, duration_s: float, make_request: Callable[[int], bytes], target: Target,
    stall_after_s: float | None = None, report: LoadReport | None = None,
) -> LoadReport:
    """Keep ``concurrency`` streams going for ``duration_s``; worker ``n`` builds its requests. A caller
    that watches the run as it goes passes the ``report`` to fill."""
    report = report if report is not None else LoadReport()
    deadline = time.perf_counter() + duration_s

    async def worker(n: int) -> None:
        while time.perf_counter() < deadline:
            try:
                report.results.append(await one_stream(target, make_request(n), stall_after_s))
            except OSError:
                report.errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    report.elapsed_s = time.perf_counter() - started
    return report


async def show_progress(report: LoadReport, out: TextIO, duration_s: float) -> None:
    """Until cancelled, once a second: streams done, their rate over the last second and errors, on one
    line rewritten in place."""
    started = last = time.perf_counter()
    done = errors = seen = 0
    while True:
        await asyncio.sleep(1)  # the display's own pace
        fresh = report.results[seen:]
        seen += len(fresh)
        finished = sum(1 for r in fresh if r.status == 200)
        done, errors = done + finished, errors + len(fresh) - finished
        now = time.perf_counter()
        out.write(f"\r{now - started:4.0f}/{duration_s:g} s  {done} streams  {finished / (now - last):.0f} "
                  f"streams/s  {errors + report.errors} errors\x1b[K")
        out.flush()
        last = now


async def drive(concurrency: int, duration_s: float, request: bytes, target: Target, stall_after_s: float,
                progress: TextIO | None) -> LoadReport:
    """The closed loop, with its progress shown on ``progress`` (then cleared) when one is given."""
    report = LoadReport()
    ticker = asyncio.create_task(show_progress(report, progress, duration_s)) if progress else None
    try:
        return await closed_loop(concurrency, duration_s, lambda n: request, target, stall_after_s, report)
    finally:
        if ticker is not None and progress is not None:
            ticker.cancel()
            progress.write("\r\x1b[K")
            progress.flush()


def print_summary(title: str, summary: dict[str, float]) -> None:
    print(f"{title}: " + ", ".join(f"{k}={v:.4g}" for k, v in summary.items()))


class LoadtestError(ValueError):
    """A load test that cannot measure what it was asked to."""


def request_body(target: Target, concurrency: int, model: str, message: str) -> dict[str, object]:
    """OpenAI's completions, ``/v1/chat`` (a new chat per stream) or one chat's messages, by the URL's path."""
    if target.path.endswith("/chat/completions"):
        return {"model": model, "stream": True, "messages": [{"role": "user", "content": message}]}
    if target.path.endswith("/v1/chat"):
        return {"message": message, "model": model}
    if concurrency > 1:
        raise LoadtestError("a chat streams one reply at a time (409 for the others): give /v1/chat, "
                            "which opens a chat per stream, or --concurrency 1")
    return {"content": message}  # in the chat's own model


def run_loadtest(url: str, token: str | None, concurrency: int, duration_s: float, model: str,
                 message: str, stall_ms: float, as_json: bool = False) -> None:
    """``gateway loadtest``: a gap between two tokens over ``stall_ms`` counts as a stall."""
    target = Target.of(url, token)
    request = request_bytes(target, target.path, request_body(target, concurrency, model, message))
    progress = sys.stderr if sys.stderr.isatty() else None
    report = uvloop.run(drive(concurrency, duration_s, request, target, stall_ms / 1000, progress))
    if as_json:  # NaN (no stream had a first token) becomes null
        print(orjson.dumps({"url": url, "concurrency": concurrency, "duration_s": duration_s,
                            **report.summary()}).decode())
    else:
        print_summary(f"{url} x{concurrency} for {duration_s:g}s", report.summary())
