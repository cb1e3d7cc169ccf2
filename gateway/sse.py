"""Server-Sent Events framing of the chat stream: ``id``, ``event`` and one line of JSON ``data``."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.turns import Turn
from providers.base import ProviderError, Usage

# Keep intermediaries from buffering or caching the stream.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def encode_event(seq: int, name: str, data: dict[str, Any]) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (seq, name.encode(), orjson.dumps(data, default=str))


def usage_body(usage: Usage) -> dict[str, int]:
    return {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
            "total_tokens": usage.input_tokens + usage.output_tokens}


class ChatEvents:
    """The chat stream's events: ``start``, ``delta``..., ``usage``, then ``done`` or ``error``, numbered."""

    def __init__(self) -> None:
        self.seq = 0

    def start(self, turn: Turn) -> bytes:
        assert turn.ids is not None
        self.seq += 1
        return encode_event(self.seq, "start", {
            "chat_id": turn.ids.chat_id, "user_message_id": turn.ids.user_message_id,
            "assistant_message_id": turn.ids.assistant_message_id, "model": turn.model,
        })

    def delta(self, text: str) -> bytes:
        self.seq += 1
        return b"id: %d\nevent: delta\ndata: %s\n\n" % (self.seq, orjson.dumps({"text": text}))

    def usage(self, usage: Usage) -> bytes:
        self.seq += 1
        return encode_event(self.seq, "usage", {"input_tokens": usage.input_tokens,
                                                "output_tokens": usage.output_tokens})

    def done(self, turn: Turn) -> bytes:
        assert turn.ids is not None
        self.seq += 1
        return encode_event(self.seq, "done", {
            "assistant_message_id": turn.ids.assistant_message_id, "finish_reason": turn.ending,
            "usage": usage_body(turn.final_usage()[0]), "duration_ms": turn.duration_ms,
        })

    def error(self, turn: Turn, error: ProviderError) -> bytes:
        self.seq += 1
        return encode_event(self.seq, "error", {"code": error.code, "message": error.message})
