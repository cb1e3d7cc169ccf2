"""Writing a stream's frames to its client: as the frames come, without a task per frame, pausing the
provider while the client is slow; and the checks one shared timer runs on every open stream (a ping
when quiet, the end of a write that never finishes)."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Coroutine
from typing import Any, Protocol, cast

from starlette.types import Send

PING = b": ping\n\n"


class Paced(Protocol):
    """What a writer pauses while its client is slow (a turn)."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...


class Watched(Protocol):
    """A stream its watch checks on."""

    ping_s: float
    send_timeout_s: float

    def hang_up(self) -> None: ...


class Writer:
    """Writes body frames from any callback without a task of its own: the ASGI send runs at once, and
    only when it has to wait (the client's socket is full) does the rest of it go to a task, while later
    frames queue and the provider is paused until the client catches up.

    Under uvicorn's httptools server, a frame goes straight to the connection's transport, chunk-framed,
    whenever uvicorn's own send would do exactly that without waiting (see ``direct_cycle``)."""

    __slots__ = ("blocked", "cycle", "queued", "send", "sends", "turn")

    def __init__(self, send: Send, turn: Paced) -> None:
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


class Watch:
    """A stream's checks, run by its loop's shared ticker: pings when quiet, and the end of a write that
    never finishes."""

    __slots__ = ("out", "quiet_since", "seen", "stream", "ticker")

    def __init__(self, stream: Watched, out: Writer, loop: asyncio.AbstractEventLoop) -> None:
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
        self.watches: set[Watch] = set()
        self.handle: asyncio.TimerHandle | None = None

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop, tick: float) -> _Ticker:
        tickers = cls._loops.setdefault(loop, {})
        if tick not in tickers:
            tickers[tick] = cls(loop, tick)
        return tickers[tick]

    def add(self, watch: Watch) -> None:
        self.watches.add(watch)
        if self.handle is None:
            self.handle = self.loop.call_later(self.tick, self.run)

    def run(self) -> None:
        now = self.loop.time()
        for watch in list(self.watches):
            watch.check(now)
        self.handle = self.loop.call_later(self.tick, self.run) if self.watches else None
