"""Server-Sent Events framing of the chat stream: ``id``, ``event`` and one line of JSON ``data``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable
from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.middleware import BODY_SEND
from gateway.turns import Turn
from providers.base import ProviderError, Usage

PING = b": ping\n\n"

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


class EventStream(Response):
    """An SSE response: the body is sent from the request's own task; one more task waits for the client.

    Kept lean for the per-token path: no task, timer or lock per frame. A timer that re-arms itself every
    quarter of the shorter of ``ping_s`` and ``send_timeout_s`` sends ``: ping`` once the stream has been
    quiet for ``ping_s``, and ends the stream when one send has been stuck for ``send_timeout_s`` (a client
    that stopped reading). A client hang-up or a stuck send calls ``on_hang_up`` and then closes the body
    (its ``GeneratorExit`` or ``CancelledError`` says the client is gone).
    """

    def __init__(
        self, body: AsyncGenerator[bytes, None], headers: dict[str, str], ping_s: float, send_timeout_s: float,
        on_hang_up: Callable[[], None],
    ) -> None:
        self.frames = body
        self.background = None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8")] + [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in {**STREAM_HEADERS, **headers}.items()
        ]
        self.ping_s = ping_s
        self.send_timeout_s = send_timeout_s
        self.on_hang_up = on_hang_up
        self.sends = 0
        self.sending = False
        self.gone = False
        self.task: asyncio.Task[Any] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        listener = loop.create_task(self._listen(receive))
        watch: _Watch | None = None
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            send = scope.get(BODY_SEND, send)
            watch = _Watch(self, send, loop)
            async with contextlib.aclosing(self.frames) as frames:
                async for frame in frames:
                    self.sending = True
                    await send({"type": "http.response.body", "body": frame, "more_body": True})
                    self.sending = False
                    self.sends += 1
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (asyncio.CancelledError, OSError):
            if not self.gone:
                raise  # not the client going: the server is stopping
            if (task := asyncio.current_task()) is not None and task.cancelling():
                task.uncancel()
        finally:
            if watch is not None:
                watch.stop()
            listener.cancel()

    async def _listen(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.hang_up()

    def hang_up(self) -> None:
        if not self.gone:
            self.gone = True
            self.on_hang_up()
            if self.task is not None:
                self.task.cancel()


class _Watch:
    """The stream's one timer: pings when quiet, and the end of a send that never finishes."""

    def __init__(self, stream: EventStream, send: Send, loop: asyncio.AbstractEventLoop) -> None:
        self.stream, self.send, self.loop = stream, send, loop
        self.tick = min(stream.ping_s, stream.send_timeout_s) / 4
        self.seen, self.quiet_since = -1, loop.time()
        self.handle = loop.call_later(self.tick, self.check)
        self.ping_task: asyncio.Task[None] | None = None

    def check(self) -> None:
        stream, now = self.stream, self.loop.time()
        if stream.sends != self.seen:
            self.seen, self.quiet_since = stream.sends, now
        elif stream.sending and now - self.quiet_since >= stream.send_timeout_s:
            stream.hang_up()  # the client stopped reading
            return
        elif not stream.sending and now - self.quiet_since >= stream.ping_s and self.ping_task is None:
            self.ping_task = self.loop.create_task(self.ping())
        self.handle = self.loop.call_later(self.tick, self.check)

    async def ping(self) -> None:
        stream = self.stream
        try:
            stream.sending = True
            await self.send({"type": "http.response.body", "body": PING, "more_body": True})
            stream.sending = False
            stream.sends += 1
        except (OSError, RuntimeError):
            pass
        finally:
            self.ping_task = None

    def stop(self) -> None:
        self.handle.cancel()
        if self.ping_task is not None:
            self.ping_task.cancel()
