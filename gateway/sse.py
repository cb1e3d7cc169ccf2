"""Server-Sent Events framing for the chat stream: ``id``, ``event`` and one line of JSON ``data``."""

from __future__ import annotations

from typing import Any

import orjson

PING = b": ping\n\n"

# Keep intermediaries from buffering or caching the stream.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def encode_event(seq: int, name: str, data: dict[str, Any]) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (seq, name.encode(), orjson.dumps(data, default=str))


def encode_delta(seq: int, text: str) -> bytes:
    """The per-token event, kept to one dumps and one format."""
    return b"id: %d\nevent: delta\ndata: %s\n\n" % (seq, orjson.dumps({"text": text}))
