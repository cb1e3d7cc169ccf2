"""Server-Sent Events framing of the chat stream: ``id``, ``event`` and one line of JSON ``data``."""

from __future__ import annotations

import asyncio
import functools
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, cast

import orjson
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from gateway.edge.middleware import BODY_SEND, RESPONSE_REST
from gateway.streaming.turns import Interrupted, StreamCodec, Turn, call_input, internal_failure
from providers.base import ProviderError, ReasoningDelta, ToolCall, ToolCallDelta, Usage
from storage.tapes import Tape

PING = b": ping\n\n"

# Keep intermediaries from buffering or caching the stream.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_BASE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8")] + [
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
        self.raw_headers = _BASE_HEADERS + [
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
        self.watch: _Watch | None = None

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
            self.watch = _Watch(self, out, loop)
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


class Writer:
    """Writes body frames from any callback without a task of its own: the ASGI send runs at once, and
    only when it has to wait (the client's socket is full) does the rest of it go to a task, while later
    frames queue and the provider is paused until the client catches up.

    Under uvicorn's httptools server, a frame goes straight to the connection's transport, chunk-framed,
    whenever uvicorn's own send would do exactly that without waiting (see ``direct_cycle``)."""

    __slots__ = ("blocked", "cycle", "queued", "send", "sends", "turn")

    def __init__(self, send: Send, turn: Turn) -> None:
        self.send = send
        self.cycle = direct_cycle(send)
        self.turn = turn
        self.sends = 0
        self.blocked: asyncio.Task[None] | None = None
        self.queued: list[bytes] = []

    def write(self, data: bytes) -> None:
        if self.blocked is not None:
            self.queued.append(data)
            return
        cycle = self.cycle
        if cycle is not None and cycle.chunked_encoding and not cycle.flow.write_paused and not cycle.disconnected:
            cycle.transport.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.sends += 1
            return
        # An ASGI send is a coroutine (uvicorn's are): stepped here once, it usually finishes at once.
        step = cast(Coroutine[Any, Any, None], self.send({"type": "http.response.body", "body": data, "more_body": True}))
        try:
            waiting = step.send(None)
        except StopIteration:
            self.sends += 1
            return
        self.turn.pause()
        self.blocked = asyncio.get_running_loop().create_task(self._finish(step, waiting))

    async def _finish(self, step: Coroutine[Any, Any, None], waiting: Any) -> None:
        try:
            while True:
                if waiting is None:
                    await asyncio.sleep(0)
                else:
                    waiting._asyncio_future_blocking = False  # as a task does with the future it is given
                    await waiting
                try:
                    waiting = step.send(None)
                except StopIteration:
                    break
            self.sends += 1
            while self.queued:
                data = b"".join(self.queued)
                self.queued.clear()
                await self.send({"type": "http.response.body", "body": data, "more_body": True})
                self.sends += 1
        finally:
            step.close()
            self.blocked = None
            self.turn.resume()

    async def drain(self) -> None:
        """Until every frame written so far has been handed to the transport."""
        if self.blocked is not None:
            await asyncio.wait([self.blocked])

    def stop(self) -> None:
        if self.blocked is not None:
            self.blocked.cancel()


_CYCLE_FIELDS = ("chunked_encoding", "disconnected", "flow", "transport")


def direct_cycle(send: Send) -> Any | None:
    """uvicorn's httptools request cycle behind ``send``, if frames may bypass it; else None.

    For a body frame of a started, chunked response, that send checks that the transport is not paused
    (else it waits) and the client not gone (else it drops the frame), then writes the frame as one HTTP
    chunk. ``Writer.write`` makes the same checks and the same write, and takes the send itself whenever
    a check fails: per relayed token, no message dict and no coroutine to build and step (measured in
    docs/performance.md). Any other server, or a cycle without those fields, gets the ASGI send.
    """
    cycle: Any = getattr(send, "__self__", None)
    if type(cycle).__module__ != "uvicorn.protocols.http.httptools_impl" or type(cycle).__name__ != "RequestResponseCycle":
        return None
    if not all(hasattr(cycle, name) for name in _CYCLE_FIELDS) or not hasattr(cycle.flow, "write_paused"):
        return None
    return cycle


class _Watch:
    """A stream's checks, run by its loop's shared ticker: pings when quiet, and the end of a write that
    never finishes."""

    __slots__ = ("out", "quiet_since", "seen", "stream", "ticker")

    def __init__(self, stream: EventStream, out: Writer, loop: asyncio.AbstractEventLoop) -> None:
        self.stream, self.out = stream, out
        self.seen, self.quiet_since = -1, loop.time()
        self.ticker = _Ticker.of(loop, min(stream.ping_s, stream.send_timeout_s) / 4)
        self.ticker.add(self)

    def check(self, now: float) -> None:
        stream, out = self.stream, self.out
        if out.sends != self.seen:
            self.seen, self.quiet_since = out.sends, now
        elif out.blocked is not None and now - self.quiet_since >= stream.send_timeout_s:
            stream.hang_up()  # the client stopped reading
        elif out.blocked is None and now - self.quiet_since >= stream.ping_s:
            out.write(PING)

    def stop(self) -> None:
        self.ticker.watches.discard(self)


class _Ticker:
    """One timer for every open stream of a loop (with the same tick): a stream costs no timer handle of
    its own, and the loop's timer heap holds one entry however many streams are open."""

    _loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[float, _Ticker]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float) -> None:
        self.loop, self.tick = loop, tick
        self.watches: set[_Watch] = set()
        self.handle: asyncio.TimerHandle | None = None

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop, tick: float) -> _Ticker:
        tickers = cls._loops.setdefault(loop, {})
        if tick not in tickers:
            tickers[tick] = cls(loop, tick)
        return tickers[tick]

    def add(self, watch: _Watch) -> None:
        self.watches.add(watch)
        if self.handle is None:
            self.handle = self.loop.call_later(self.tick, self.run)

    def run(self) -> None:
        now = self.loop.time()
        for watch in list(self.watches):
            watch.check(now)
        self.handle = self.loop.call_later(self.tick, self.run) if self.watches else None
