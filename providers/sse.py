"""An incremental Server-Sent Events decoder for upstream streams: bytes to lines to events.

Lines are split on bytes and only whole lines are kept, so a multi-byte character split across network
chunks is never decoded in halves (data stays bytes; the adapters hand it to orjson). ``\\n``, ``\\r\\n``
and ``\\r`` all end a line. A line or an event past its cap is a protocol error, not unbounded memory.
``read_batches`` drives it for the adapters: each vendor supplies only what one event means.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

import orjson

from providers.base import ProviderError, ProviderProtocolError, StreamBatch

MAX_LINE_BYTES = 1 << 20
MAX_EVENT_BYTES = 4 << 20

# One decoded event: its name (None when the stream gave none) and its data lines joined by "\n".
SSEEvent = tuple[bytes | None, bytes]


class SSEDecoder:
    __slots__ = ("_data", "_max_event", "_max_line", "_name", "_pending", "_size")

    def __init__(self, max_line: int = MAX_LINE_BYTES, max_event: int = MAX_EVENT_BYTES) -> None:
        self._pending = b""
        self._name: bytes | None = None
        self._data: list[bytes] = []
        self._size = 0
        self._max_line = max_line
        self._max_event = max_event

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """The events completed by ``chunk``."""
        lines = (self._pending + chunk).splitlines(keepends=True) if self._pending else chunk.splitlines(True)
        self._pending = b""
        # The last piece is incomplete without a line end; one ending in "\r" may yet become "\r\n".
        if lines and (lines[-1][-1:] not in (b"\n", b"\r") or lines[-1][-1:] == b"\r"):
            self._pending = lines.pop()
            if len(self._pending) > self._max_line:
                raise ProviderProtocolError("An upstream stream line exceeds the size limit")
        events: list[SSEEvent] = []
        for line in lines:
            self._line(line.rstrip(b"\r\n"), events)
        return events

    def close(self) -> list[SSEEvent]:
        """Events completed by the end of the stream (a last line or event with no blank line after it)."""
        events: list[SSEEvent] = []
        if self._pending:
            self._line(self._pending.rstrip(b"\r\n"), events)
            self._pending = b""
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[SSEEvent]) -> None:
        if not line:
            if self._data:
                events.append((self._name, b"\n".join(self._data)))
            self._name, self._data, self._size = None, [], 0
            return
        if line[0] == 0x3A:  # ":" starts a comment, e.g. a keep-alive
            return
        field, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            self._size += len(value)
            if self._size > self._max_event:
                raise ProviderProtocolError("An upstream event exceeds the size limit")
            self._data.append(value)
        elif field == b"event":
            self._name = value


class StreamReader(Protocol):
    """One stream's reading of a vendor's SSE events as our events."""

    def event(self, name: bytes | None, data: bytes, batch: StreamBatch) -> bool:
        """Append what one event means to ``batch``; True once the stream is complete."""

    def end(self, batch: StreamBatch) -> None:
        """The bytes ended before ``event`` said the stream was complete: append the last events or raise."""


def json_frame(data: bytes, vendor: str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ProviderProtocolError(f"{vendor} sent a malformed frame") from None


async def read_batches(chunks: AsyncIterator[bytes], reader: StreamReader) -> AsyncIterator[StreamBatch]:
    """A vendor's byte stream as batches, one per network read. When a read holds both deltas and a
    failure, the deltas are yielded first: the client gets everything the vendor sent before it failed."""
    decoder = SSEDecoder()
    async for chunk in chunks:
        batch: StreamBatch = []
        try:
            for name, data in decoder.feed(chunk):
                if reader.event(name, data, batch):
                    yield batch
                    return
        except ProviderError:
            if batch:
                yield batch
            raise
        if batch:
            yield batch
    batch = []
    for name, data in decoder.close():
        if reader.event(name, data, batch):
            yield batch
            return
    reader.end(batch)
    yield batch
