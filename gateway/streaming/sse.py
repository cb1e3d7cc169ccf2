"""Server-Sent Events: the chat stream's framing (``id``, ``event`` and one line of JSON ``data``) and a
turn relayed as an SSE response (its writer and checks: gateway/streaming/writer.py)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from gateway.edge.middleware import BODY_SEND, RESPONSE_REST
from gateway.streaming.turns import Interrupted, StreamCodec, Turn, call_input, internal_failure
from gateway.streaming.writer import Watch, Writer
from providers.base import ProviderError, ReasoningDelta, ToolCall, ToolCallDelta, Usage
from storage.tapes import Tape

# Keep intermediaries from buffering or caching the stream.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
RAW_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8")] + [
    (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in STREAM_HEADERS.items()
]


def encode_event(seq: int, name: str, data: dict[str, Any]) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (seq, name.encode(), orjson.dumps(data, default=str))


def usage_body(usage: Usage) -> dict[str, int]:
    body = {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
            "total_tokens": usage.input_tokens + usage.output_tokens}
    if usage.reasoning_tokens is not None:
        body["reasoning_tokens"] = usage.reasoning_tokens
    return body


def call_body(call: ToolCall) -> dict[str, object]:
    """A whole tool call as the chat stream and the UI stream give it: its input parsed, or, when its
    arguments are not JSON, the raw string with ``input_error``."""
    value, problem = call_input(call.arguments)
    body: dict[str, object] = {"id": call.id, "name": call.name, "input": value}
    if problem is not None:
        body["input_error"] = problem
    return body


class ChatEvents:
    """The chat stream's events: ``start``; ``delta``, ``reasoning``, ``tool_call_start``, ``tool_call_delta``
    and ``tool_call`` (a whole call) in stream order; ``usage``; then ``done`` (after ``title`` when a model
    wrote the chat's title in time) or ``error``, numbered."""

    __slots__ = ("seq",)

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

    def reasoning(self, delta: ReasoningDelta) -> bytes | None:
        if not delta.text:
            return None  # a signature, or redacted reasoning: stored, nothing to show
        self.seq += 1
        return b"id: %d\nevent: reasoning\ndata: %s\n\n" % (self.seq, orjson.dumps({"text": delta.text}))

    def tool_call(self, delta: ToolCallDelta, call_id: str) -> bytes:
        frames = b""
        if delta.id is not None or delta.name is not None:  # the call's first piece
            self.seq += 1
            frames = encode_event(self.seq, "tool_call_start", {"id": call_id, "name": delta.name or ""})
        if not delta.arguments:
            return frames
        self.seq += 1
        return frames + encode_event(self.seq, "tool_call_delta", {"id": call_id, "arguments": delta.arguments})

    def tool_done(self, call: ToolCall) -> bytes:
        self.seq += 1
        return encode_event(self.seq, "tool_call", call_body(call))

    def done(self, turn: Turn) -> bytes:
        assert turn.ids is not None
        title = self.title(turn.title) if turn.title is not None else b""
        self.seq += 1
        return title + encode_event(self.seq, "done", {
            "assistant_message_id": turn.ids.assistant_message_id, "finish_reason": turn.ending,
            "usage": usage_body(turn.final_usage()[0]), "duration_ms": turn.duration_ms,
        })

    def title(self, title: str) -> bytes:
        self.seq += 1
        return encode_event(self.seq, "title", {"title": title})

    def error(self, turn: Turn, error: ProviderError) -> bytes:
        self.seq += 1
        return encode_event(self.seq, "error", {"code": error.code, "message": error.message})


class EventStream(Response):
    """A turn as an SSE response, relayed: the provider's reads are written to the client from the
    provider connection's own callbacks, and the request's task only waits, in ``receive``, for the client
    to hang up or for the turn to wake it at its end. No task, timer or lock per frame, and no task but the
    request's own per stream.

    Every quarter of the shorter of ``ping_s`` and ``send_timeout_s``, one timer shared by all streams
    checks each: it writes ``: ping`` once a stream has been quiet for ``ping_s``, and hangs up when one
    write has been stuck for ``send_timeout_s`` (a client that stopped reading).

    With a ``tape``, every frame is also kept for resumers (storage/tapes.py), the last one included. When
    the client goes, the turn is cancelled; or, with ``detach_s`` (``on_disconnect: "continue"``), it runs
    on unread for at most that long, its frames kept, and ends as it would have.
    """

    def __init__(
        self, turn: Turn, codec: StreamCodec, headers: dict[str, str], ping_s: float, send_timeout_s: float,
        tape: Tape | None = None, detach_s: float | None = None,
    ) -> None:
        self.turn = turn
        self.codec = codec
        self.tape = tape
        self.detach_s = detach_s
        self.background = None
        self.raw_headers = RAW_HEADERS + [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items() if k not in STREAM_HEADERS
        ]
        self.ping_s = ping_s
        self.send_timeout_s = send_timeout_s
        self.gone = False  # the client hung up, or stopped reading
        self.over = False  # nothing more to wait for: the turn ended or the client is gone
        self.listening = False  # the request's task is waiting in ``receive``
        self.woken = False  # ... and was cancelled out of it by ``wake``
        self.deadline = 0.0  # when a turn running on unread is ended
        self.task: asyncio.Task[Any] | None = None
        self.out: Writer | None = None
        self.watch: Watch | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        out = Writer(scope.get(BODY_SEND, send), self.turn)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        except (OSError, RuntimeError):  # the client's connection failed under the send
            await self.turn.finish(ending="client_disconnected")
            return
        except BaseException:
            await self._interrupted()
            raise
        if RESPONSE_REST in scope and scope[RESPONSE_REST] is None:
            # The start went through the stack's wrappers (they look at it); the rest runs once the stack
            # has returned (gateway/app.py), holding none of its frames or ``send`` closures.
            scope[RESPONSE_REST] = functools.partial(self.rest, out)
        else:
            await self.rest(out, receive)

    async def rest(self, out: Writer, receive: Receive) -> None:
        self.task = asyncio.current_task()
        self.out = out
        loop = asyncio.get_running_loop()
        failure: ProviderError | None = None
        try:
            self.watch = Watch(self, out, loop)
            self.turn.relay(self.codec, out.write if self.tape is None else self._kept(out.write), self.wake)
            await self._wait(receive)
            if not self.gone:
                await out.drain()
                last = await self.turn.last_frame()
                self._keep_end(last)
                await out.send({"type": "http.response.body", "body": last, "more_body": False})
            elif self.detach_s is not None:
                self._keep_end(await self.turn.last_frame())
        except asyncio.CancelledError:
            # Not a wake-up: the server is giving up on the stream (shutdown).
            self.listening = False
            await self._interrupted()
            raise
        except (OSError, RuntimeError):  # the client's connection failed under a send
            self.gone = True
        except Exception as error:  # a bug of ours: the turn still ends, stored and settled
            failure = internal_failure(error, self.turn.model)
        finally:
            if self.watch is not None:
                self.watch.stop()
            out.stop()
            self.turn.detach()
            self.watch = self.out = None  # they point back here: freed by reference, not by the collector
        if failure is not None:
            await self.turn.finish(error=failure)
            self._keep_end(self.codec.error(self.turn, failure))
        elif self.gone and self.turn.ending is None:
            self._keep_end(await self.turn.last_frame(ending="client_disconnected"))

    def _kept(self, write: Callable[[bytes], None] | None) -> Callable[[bytes], None]:
        """``write`` (none: only keep), each frame also kept on the tape with its number."""
        tape, codec = self.tape, self.codec
        assert tape is not None
        if type(codec) is ChatEvents:
            numbered = codec

            def keep(data: bytes) -> None:
                tape.add(data, numbered.seq)
        else:
            def keep(data: bytes) -> None:
                tape.add(data, tape.last + 1)
        if write is None:
            return keep

        def both(data: bytes) -> None:
            write(data)
            keep(data)
        return both

    def _keep_end(self, frame: bytes) -> None:
        tape = self.tape
        if tape is not None:
            tape.end(frame, self.codec.seq if type(self.codec) is ChatEvents else tape.last + 1, self.turn.unstored)

    async def _interrupted(self) -> None:
        """The server gave up on the stream: the turn ends ``interrupted`` (the registry stores it)."""
        self.turn.interrupt("interrupted")
        await self.turn.finish(ending="interrupted", shielded=True)
        if self.turn.ids is not None:
            self._keep_end(self.codec.error(self.turn, Interrupted()))

    async def _wait(self, receive: Receive) -> None:
        task = self.task
        assert task is not None
        loop = asyncio.get_running_loop()
        while not self.over:
            self.listening = True
            message: Message | None = None
            try:
                if self.gone:  # running on unread: until the turn wakes this at its end, or the deadline
                    await asyncio.sleep(self.deadline - loop.time())
                else:
                    message = await receive()
            except asyncio.CancelledError:
                if not self.woken or task.uncancel() > 0:
                    raise
                self.woken = False
                continue
            finally:
                self.listening = False
            if message is None:  # ran ``detach_s`` unread: the turn ends there, its answer kept
                self.turn.interrupt("client_disconnected")
                self.over = True
            elif message["type"] == "http.disconnect":
                self.hang_up()

    def wake(self) -> None:
        """The turn is over (or the client gone): end the wait in ``receive``."""
        if not self.over:
            self.over = True
            self._rouse()

    def _rouse(self) -> None:
        if self.listening and self.task is not None:
            self.woken = True
            self.task.cancel()

    def hang_up(self) -> None:
        if self.gone:
            return
        self.gone = True
        if self.detach_s is None:
            self.turn.hang_up()
            self.wake()
            return
        # ``continue``: the turn runs on with no client, its frames only kept, for ``detach_s`` at most.
        self.deadline = asyncio.get_running_loop().time() + self.detach_s
        self.turn.rewire(_drop if self.tape is None else self._kept(None))
        if self.watch is not None:
            self.watch.stop()
        if self.out is not None:
            self.out.stop()  # a write stuck on the gone client: dropped, and the provider read again
        self._rouse()  # out of ``receive`` (a frozen client may never close), into the wait for the end


def _drop(data: bytes) -> None:
    pass
