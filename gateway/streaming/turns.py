"""One assistant reply in flight: pulls the provider's events, streams them, and records how it ended.

A turn ends exactly one way, recorded once in ``ending``:
- the provider finished (``stop``, ``length``, ...): status ``complete``;
- ``POST /stop`` from any instance interrupted it: ``cancelled``;
- the client hung up or stopped reading: ``client_disconnected``, status ``cancelled``;
- the provider failed: ``error``;
- the server shut down: ``interrupted``.
Whatever the ending, what was handed to the client so far is kept: its text, and its reasoning and tool
calls in stream order (``stored_parts``).

Past 400 lines because a turn is one state machine: its phases (pulled to the first token, relayed,
collected, ended) share the state that decides how it ends.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from providers.base import (
    Finish,
    ProviderError,
    ProviderRequest,
    ProviderStream,
    ReasoningDelta,
    StreamBatch,
    StreamEvent,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from storage.chats import Owner
from storage.messages import FinishedReply
from storage.quotas import Ticket

logger = logging.getLogger("gateway.streaming.turns")

_STATUS_OF = {
    "stop": "complete",
    "length": "complete",
    "content_filter": "complete",
    "tool_calls": "complete",
    "cancelled": "cancelled",
    "client_disconnected": "cancelled",
    "error": "error",
    "interrupted": "interrupted",
}
# Characters per token for the documented estimate used when a provider reports no usage.
CHARS_PER_TOKEN = 4
# Output tokens a turn's reservation grows by at a time, once its answer nears what it reserved; asked half
# a batch ahead, so a turn the budgets refuse has overspent them by at most about one batch.
GROW_BATCH = 256
_NEVER = sys.maxsize


class BudgetExhausted(ProviderError):
    """The answer outgrew its reservation and the budgets cover no more: the turn ends there, its partial
    kept, as an ``error`` the client is told about (``quota_exceeded``)."""

    code = "quota_exceeded"
    http_status = 429

    def __init__(self) -> None:
        super().__init__("The token budget ran out while the answer streamed")


class StoreUnavailable(ProviderError):
    """PostgreSQL took no final write within ``GATEWAY_STORE_RETRY_S``: the client is told, and the reply is
    stored from the turn's kept events once PostgreSQL is back (``StreamRegistry.recover``)."""

    code = "store_unavailable"
    http_status = 503

    def __init__(self) -> None:
        super().__init__("The reply could not be stored yet; it will be stored when the database is back")


class Interrupted(ProviderError):
    """The turn's server went away (shut down, or died) before its end."""

    code = "interrupted"
    http_status = 503

    def __init__(self) -> None:
        super().__init__("The gateway instance running this reply went away before it ended")


def estimate_tokens(chars: int) -> int:
    return -(-chars // CHARS_PER_TOKEN)


def storable(text: str) -> str:
    """A model's text without the NULs PostgreSQL cannot store: dropped from the stream and the stored
    reply alike, so the two always agree."""
    return text.replace("\x00", "") if "\x00" in text else text


def closed_ending(ending: str | None) -> str:
    """An ending from the closed set the database and the metrics take; anything else (an adapter's unknown
    finish reason) is ``stop``, and logged."""
    if ending is None:
        return "stop"
    if ending not in _STATUS_OF:
        logger.warning("an unknown ending was taken as stop", extra={"ending": ending[:100]})
        return "stop"
    return ending


def internal_failure(error: BaseException, model: str) -> ProviderError:
    """Any other exception out of a provider call, as the failure it ends the turn with (logged whole)."""
    logger.error("a provider call failed unexpectedly", exc_info=error, extra={"model": model[:200]})
    return ProviderError("The gateway failed while calling the model provider")


def call_input(arguments: str) -> tuple[Any, str | None]:
    """A tool call's arguments as its input: the parsed JSON (none at all is ``{}``), or, when they are not
    JSON, the raw string and why."""
    if not arguments.strip():
        return {}, None
    try:
        return orjson.loads(arguments), None
    except orjson.JSONDecodeError as error:
        return arguments, f"the arguments are not JSON: {str(error)[:200]}"


class ReasoningPiece:
    """One piece of reasoning in a turn (see ``ReasoningDelta``), begun after ``at`` text deltas."""

    __slots__ = ("at", "closed", "redacted", "signature", "texts")

    def __init__(self, at: int, redacted: str | None = None) -> None:
        self.at = at
        self.texts: list[str] = []
        self.signature: str | None = None
        self.redacted = redacted
        self.closed = redacted is not None


class CallPiece:
    """Where tool call ``index`` (its pieces in ``Turn.tool_parts``) began: after ``at`` text deltas."""

    __slots__ = ("at", "index")

    def __init__(self, at: int, index: int) -> None:
        self.at, self.index = at, index


class StreamCodec(Protocol):
    """How a turn's events become bytes on the wire; one instance per stream (it may count frames)."""

    def start(self, turn: Turn) -> bytes | None: ...

    def delta(self, text: str) -> bytes: ...

    def usage(self, usage: Usage) -> bytes | None: ...

    def reasoning(self, delta: ReasoningDelta) -> bytes | None: ...

    def tool_call(self, delta: ToolCallDelta, call_id: str) -> bytes | None:
        """A piece of call ``call_id`` as it streams (the first one has its name)."""

    def tool_done(self, call: ToolCall) -> bytes | None:
        """Call ``call`` is whole: the model went on to text, another call or its end."""

    def done(self, turn: Turn) -> bytes: ...

    def error(self, turn: Turn, error: ProviderError) -> bytes: ...


@dataclass(frozen=True, slots=True)
class TurnIds:
    chat_id: uuid.UUID
    user_message_id: uuid.UUID
    assistant_message_id: uuid.UUID


class Turn:
    """The state of one streamed reply. ``finisher`` persists the ending (and frees the chat, if any).

    ``ids`` names the chat and messages of a chat turn; a turn of the OpenAI-compatible surface has none.
    """

    __slots__ = (
        "_buffered", "_codec", "_extend", "_extending", "_failure", "_finisher", "_finishing", "_head",
        "_open_call", "_stop_reason", "_stored", "_task", "_upstream", "_upstream_finish", "_waiting", "_wake",
        "_write", "chars", "checkpointed_at", "checkpointed_parts", "checkpointed_shape", "covered",
        "duration_ms", "ending", "error", "first_token_s", "grow_at_chars", "grow_at_parts", "ids", "model",
        "owner", "parts", "request", "segments", "shape", "started", "ticket", "title", "title_wait",
        "tool_parts", "unstored", "usage",
    )

    def __init__(
        self,
        model: str,
        request: ProviderRequest,
        upstream: ProviderStream,
        finisher: Callable[[Turn], Awaitable[None]],
        ids: TurnIds | None = None,
    ) -> None:
        self.ids = ids
        self.model = model
        self.request = request
        self.parts: list[str] = []  # the text deltas
        self.tool_parts: dict[int, tuple[str, str, list[str]]] = {}  # a call's index -> id, name, arguments
        # The reasoning and calls in stream order, each knowing how many text deltas came before it: the
        # text between them is found in ``parts``, so a text delta costs nothing more. ``shape`` counts the
        # events that changed them (a checkpoint writes them when it moved).
        self.segments: list[ReasoningPiece | CallPiece] = []
        self.shape = 0
        self._open_call: int | None = None  # the call whose ``tool_done`` is still to be sent
        self.usage: Usage | None = None
        self.ending: str | None = None
        self.error: ProviderError | None = None
        self.started = time.perf_counter()
        self.first_token_s: float | None = None
        self.duration_ms = 0.0
        self.checkpointed_parts = self.checkpointed_shape = 0
        self.checkpointed_at = self.started
        self.ticket: Ticket | None = None  # its quota reservation, settled when the turn is stored
        self.unstored: FinishedReply | None = None  # the reply PostgreSQL did not take in time (``StoreUnavailable``)
        self.owner: Owner | None = None  # who is charged, for a turn with no chat
        # A chat's first turn: the title a model writes beside it (gateway/streaming/titles.py), awaited for
        # a bounded time once the turn is stored, and the title when that wait found it written.
        self.title_wait: Callable[[], Awaitable[str | None]] | None = None
        self.title: str | None = None
        self._upstream = upstream
        self._finisher = finisher
        self._buffered: list[StreamBatch] = []
        self._upstream_finish: str | None = None
        self._stop_reason: str | None = None
        self._task: asyncio.Task[Any] | None = None  # the task pulling events, set once per phase
        self._waiting = False  # whether that task is waiting on the provider right now
        self._finishing: asyncio.Task[None] | None = None
        self._stored: asyncio.Future[None] | None = None  # made by the first caller of ``finished``
        # While relaying: the codec, where frames go, who to wake at the end, and how the provider ended.
        self._codec: StreamCodec | None = None
        self._write: Callable[[bytes], None] | None = None
        self._wake: Callable[[], None] | None = None
        self._head = b""
        self._failure: ProviderError | None = None
        # The output its reservation covers, grown as the answer nears it (see ``watch_output``): output
        # so far in characters, and the marks that ask for more. Never, for a turn nothing limits.
        self.chars = 0
        self.covered = 0
        self.grow_at_chars = self.grow_at_parts = _NEVER
        self._extend: Callable[[int], Awaitable[bool]] | None = None
        self._extending: asyncio.Future[None] | None = None

    # -- control from outside the streaming task --------------------------------------------------

    def interrupt(self, reason: str) -> None:
        """End the turn with ``reason`` (``cancelled`` or ``interrupted``) as soon as possible.

        A relayed turn closes the provider call at once and wakes its stream to end; a task waiting on the
        provider is cancelled there, which closes the call; otherwise the flag is seen before the next batch.
        """
        if self._stop_reason is None and self.ending is None:
            self._stop_reason = reason
            if self._wake is not None:
                self._upstream.close()
                self._wake()
            elif self._waiting and self._task is not None:
                self._task.cancel()

    def overdraw(self) -> None:
        """The budgets cover no more output: end the turn now with ``BudgetExhausted``."""
        if self._stop_reason is None and self.ending is None:
            self._failure = BudgetExhausted()
            self.interrupt("error")

    def hang_up(self) -> None:
        """The client went away: a relayed turn stops reading the provider now; either way the turn then
        ends as ``client_disconnected``."""
        if self._wake is not None:
            self._upstream.close()

    # -- pulling events ---------------------------------------------------------------------------

    async def _pull(self) -> StreamBatch | None:
        """The next batch of provider events, or None once the provider is done or the turn was interrupted."""
        if self._buffered:
            return self._buffered.pop(0)
        return await self._read()

    async def _read(self) -> StreamBatch | None:
        """The provider's next batch (past what ``open`` buffered), or None at its end or once interrupted."""
        if self._stop_reason is not None:
            return None
        self._waiting = True
        try:
            return await anext(self._upstream)
        except StopAsyncIteration:
            return None
        except asyncio.CancelledError:
            if self._stop_reason is None:
                raise
            # Our own interrupt: the provider call is closed, and the turn goes on to report it.
            self._task.uncancel()
            return None
        except ProviderError:
            raise
        except Exception as error:  # an adapter's bug is still a failed call: the turn ends the one way
            raise internal_failure(error, self.model) from error
        finally:
            self._waiting = False

    @property
    def stopped(self) -> bool:
        return self._stop_reason is not None

    async def switch_upstream(self, model: str, upstream: ProviderStream) -> None:
        """Before the first token only: drop the failed provider call and go on with another."""
        await self.close_upstream()
        self.model, self._upstream, self._buffered = model, upstream, []

    def watch_output(self, covered: int, extend: Callable[[int], Awaitable[bool]]) -> None:
        """Grow the turn's reservation (``extend``, True when the budgets cover the tokens asked) a batch at
        a time once its output nears the ``covered`` tokens it reserved; when they cover no more, the turn
        ends (``overdraw``). For a turn with no output cap of its own: a vendor enforces ``max_tokens``."""
        self.covered, self._extend = covered, extend
        self._mark_growth()

    def _mark_growth(self) -> None:
        mark = self.covered - min(GROW_BATCH, self.covered) // 2  # half a batch ahead
        self.grow_at_parts, self.grow_at_chars = mark, mark * CHARS_PER_TOKEN

    def _outgrown(self) -> None:
        """The output reached its mark (by characters or by deltas): ask for a batch more, once at a time."""
        self.grow_at_chars = self.grow_at_parts = _NEVER
        if self.ending is None and self._extend is not None:
            self._extending = asyncio.ensure_future(self._grow(self._extend))

    async def _grow(self, extend: Callable[[int], Awaitable[bool]]) -> None:
        try:
            covered = await extend(GROW_BATCH)
        except Exception:
            logger.exception("extending a reservation failed", extra={"model": self.model})
            covered = True  # the settlement still charges what the turn used
        if not covered:
            self.overdraw()
        elif self.ending is None:
            self.covered += GROW_BATCH
            self._mark_growth()

    async def open(self) -> None:
        """Wait for the first token (or the end), so a failure before it can still be a plain JSON error."""
        self._task = asyncio.current_task()
        while True:
            batch = await self._read()
            if batch is None:
                return
            self._buffered.append(batch)
            if any(isinstance(event, (str, Finish, ToolCallDelta, ReasoningDelta)) for event in batch):
                return

    def _take(self, event: StreamEvent) -> None:
        if isinstance(event, Usage):
            self.usage = event
        elif isinstance(event, Finish):
            self._upstream_finish = event.reason
        elif isinstance(event, ToolCallDelta):
            self._tool_call(event)
        elif isinstance(event, ReasoningDelta):
            self._reasoning(event)

    def _produced(self, chars: int) -> None:
        """Output other than text (reasoning, a call's arguments): timed, counted toward growth."""
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.started
        self.shape += 1
        self.chars += chars
        if self.chars >= self.grow_at_chars:
            self._outgrown()

    def _tool_call(self, delta: ToolCallDelta) -> None:
        self._produced(len(delta.arguments))
        call = self.tool_parts.get(delta.index)
        if call is None:
            self.tool_parts[delta.index] = (delta.id or f"call_{uuid.uuid4().hex[:24]}", delta.name or "",
                                            [delta.arguments])
            self.segments.append(CallPiece(len(self.parts), delta.index))
        else:
            call[2].append(delta.arguments)

    def _reasoning(self, delta: ReasoningDelta) -> None:
        """Consecutive deltas make a piece; a signature closes it, and text or a call ends it."""
        self._produced(len(delta.text))
        at = len(self.parts)
        if delta.redacted is not None:
            self.segments.append(ReasoningPiece(at, delta.redacted))
            return
        last = self.segments[-1] if self.segments else None
        if type(last) is not ReasoningPiece or last.closed or last.at != at:
            last = ReasoningPiece(at)
            self.segments.append(last)
        last.texts.append(delta.text)
        if delta.signature is not None:
            last.signature, last.closed = delta.signature, True

    def _call_done(self) -> bytes | None:
        """The open call's ``tool_done`` frame, once."""
        index, self._open_call = self._open_call, None
        assert index is not None and self._codec is not None
        call_id, name, arguments = self.tool_parts[index]
        return self._codec.tool_done(ToolCall(call_id, name, "".join(arguments)))

    def _delivered(self, texts: list[str]) -> None:
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.started
        self.parts += texts
        self.chars += sum(map(len, texts))
        if self.chars >= self.grow_at_chars or len(self.parts) >= self.grow_at_parts:
            self._outgrown()

    # -- the two ways to deliver a turn -----------------------------------------------------------

    def relay(self, codec: StreamCodec, write: Callable[[bytes], None], wake: Callable[[], None]) -> None:
        """Stream the rest of the turn from the provider's own callbacks: each batch of events becomes one
        ``write`` (the opening frame goes with the first), and ``wake`` is called once the provider is done,
        failed, or the turn was stopped. Then ``last_frame`` stores the ending and gives the closing frame."""
        self._codec, self._write, self._wake = codec, write, wake
        self._head = codec.start(self) or b""
        self._task = None  # no task waits on the provider from here on
        buffered, self._buffered = self._buffered, []
        for batch in buffered:
            self.deliver(batch)
        if self._stop_reason is not None:
            self._upstream.close()
            wake()
        else:
            self._upstream.relay(self)

    def rewire(self, write: Callable[[bytes], None]) -> None:
        """From now on, frames go to ``write`` (the stream's client is gone, the turn runs on)."""
        self._write = write

    def detach(self) -> None:
        """The stream is over: drop its ``write`` and ``wake``, methods of the objects that hold this turn,
        so the stream's objects are freed by their last reference rather than by a full collection."""
        self._write = self._wake = None

    def deliver(self, batch: StreamBatch) -> None:
        codec = self._codec
        assert codec is not None and self._write is not None
        if (len(batch) == 1 and type(text := batch[0]) is str and self.first_token_s is not None and not self._head
                and self._open_call is None and "\x00" not in text):
            # The usual read of a paced stream: one token, after the first.
            self._write(codec.delta(text))
            self.parts.append(text)
            self.chars += len(text)
            if self.chars >= self.grow_at_chars or len(self.parts) >= self.grow_at_parts:
                self._outgrown()
            return
        frames: list[bytes] = [self._head] if self._head else []
        texts: list[str] = []
        for event in batch:
            if type(event) is str:
                if not (event := storable(event)):
                    continue
                if self._open_call is not None:
                    frames.append(self._call_done() or b"")
                frames.append(codec.delta(event))
                texts.append(event)
            elif isinstance(event, (Usage, Finish)):
                self._take(event)
                if type(event) is Usage and (frame := codec.usage(event)):
                    frames.append(frame)
            else:
                if texts:  # the text so far comes before this event
                    self._delivered(texts)
                    texts = []
                frames += self._other(event, codec)
        if frames:
            self._write(b"".join(frames))
            self._head = b""
        if texts:
            self._delivered(texts)  # handed to the transport, or queued behind a write the client is slow to take

    def _other(self, event: StreamEvent, codec: StreamCodec) -> list[bytes]:
        """The frames of a reasoning delta or a call's piece, after the open call's end when this ends it."""
        frames = []
        call = event if isinstance(event, ToolCallDelta) else None
        starts = call is None or call.index != self._open_call
        if self._open_call is not None and starts and (frame := self._call_done()):
            frames.append(frame)
        self._take(event)
        frame = None
        if call is not None:
            self._open_call = call.index
            frame = codec.tool_call(call, self.tool_parts[call.index][0])
        elif isinstance(event, ReasoningDelta):
            frame = codec.reasoning(event)
        if frame:
            frames.append(frame)
        return frames

    def ended(self, failure: ProviderError | None) -> None:
        self._failure = failure
        if self._wake is not None:
            self._wake()

    def pause(self) -> None:
        self._upstream.pause()

    def resume(self) -> None:
        self._upstream.resume()

    async def last_frame(self, ending: str | None = None) -> bytes:
        """Once the relay is over: the ending stored, then the frame that tells the client how it ended
        (``StoreUnavailable`` when it could not be stored)."""
        assert self._codec is not None
        head, self._head = self._head, b""
        if self._open_call is not None:
            head += self._call_done() or b""
        if self._failure is not None:
            await self.finish(error=self._failure)
            return head + self._codec.error(self, self._failure)
        await self.finish(ending=ending)
        if self.unstored is not None:
            return head + self._codec.error(self, StoreUnavailable())
        if self.title_wait is not None:  # the title a model writes beside the turn, if written in time
            self.title = await self.title_wait()
        return head + self._codec.done(self)

    async def collect(self) -> None:
        """Run the turn to its end without a client stream (the JSON answer)."""
        self._task = asyncio.current_task()
        failure: ProviderError | None = None
        try:
            while (batch := await self._pull()) is not None:
                self._collected(batch)
        except asyncio.CancelledError:
            await self.finish(ending="interrupted", shielded=True)
            raise
        except Exception as error:
            failure = error if isinstance(error, ProviderError) else internal_failure(error, self.model)
        await self.finish(error=failure)

    def _collected(self, batch: StreamBatch) -> None:
        """A batch taken in order, with no stream to write it to."""
        texts: list[str] = []
        for event in batch:
            if type(event) is str:
                if text := storable(event):
                    texts.append(text)
                continue
            if texts and isinstance(event, (ReasoningDelta, ToolCallDelta)):
                self._delivered(texts)
                texts = []
            self._take(event)
        if texts:
            self._delivered(texts)

    # -- ending -----------------------------------------------------------------------------------

    async def finish(
        self, *, ending: str | None = None, error: ProviderError | None = None, shielded: bool = False
    ) -> None:
        """Record the ending once, close the provider call and persist; safe to call again."""
        if self.ending is None:
            self.error = error = error or self._failure
            self.ending = closed_ending("error" if error else self._stop_reason or ending or self._upstream_finish)
            if self.ending == "stop" and self.tool_parts:  # a vendor that says stop but waits for results
                self.ending = "tool_calls"
            self.duration_ms = round((time.perf_counter() - self.started) * 1000, 1)
            self._finishing = asyncio.create_task(self._close_and_persist())
        assert self._finishing is not None
        if shielded:
            # Cancelled or closed: the persisting task goes on by itself; the registry waits for it.
            return
        await asyncio.shield(self._finishing)

    async def finished(self) -> None:
        """Wait until the turn has ended and its ending is stored."""
        if self._finishing is None or not self._finishing.done():
            if self._stored is None:
                self._stored = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._stored)

    async def close_upstream(self) -> None:
        try:
            await self._upstream.aclose()
        except Exception:
            logger.warning("closing the provider stream failed", exc_info=True)

    async def _close_and_persist(self) -> None:
        await self.close_upstream()
        try:
            await self._finisher(self)
        finally:
            if self._stored is not None:
                self._stored.set_result(None)

    @property
    def status(self) -> str:
        return _STATUS_OF.get(self.ending or "", "complete")

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The tool calls the model made, whole, in order."""
        return [ToolCall(id, name, "".join(arguments)) for _, (id, name, arguments) in sorted(self.tool_parts.items())]

    @property
    def reasoning_text(self) -> str:
        return "".join(text for piece in self.segments if type(piece) is ReasoningPiece for text in piece.texts)

    def stored_parts(self) -> list[dict[str, Any]] | None:
        """The reply's parts in stream order (text, reasoning, tool calls); None for a reply of text alone,
        which its content holds."""
        if not self.segments:
            return None
        parts: list[dict[str, Any]] = []
        start = 0
        for segment in self.segments:
            if segment.at > start:
                parts.append({"type": "text", "text": "".join(self.parts[start:segment.at])})
                start = segment.at
            parts.append(self._part(segment))
        if len(self.parts) > start:
            parts.append({"type": "text", "text": "".join(self.parts[start:])})
        return parts

    def _part(self, segment: ReasoningPiece | CallPiece) -> dict[str, Any]:
        if type(segment) is ReasoningPiece:
            part: dict[str, Any] = {"type": "reasoning", "text": "".join(segment.texts)}
            if segment.signature is not None:
                part["signature"] = segment.signature
            if segment.redacted is not None:
                part["redacted"] = segment.redacted
            return part
        assert type(segment) is CallPiece
        call_id, name, arguments = self.tool_parts[segment.index]
        value, problem = call_input("".join(arguments))
        part = {"type": "tool-call", "tool_call_id": call_id, "tool_name": name, "input": value}
        if problem is not None:
            part["input_error"] = problem
        return part

    def final_usage(self) -> tuple[Usage, bool]:
        """The provider's usage when it reported one, else the documented estimate (and True)."""
        if self.usage is not None:
            return self.usage, False
        output = len(self.text) + sum(len(call.arguments) for call in self.tool_calls) + len(self.reasoning_text)
        return Usage(estimate_tokens(self.request.prompt_chars), estimate_tokens(output)), True

    def charged_tokens(self) -> int:
        """What the turn costs: nothing when it failed before producing anything, else prompt and output."""
        if self.ending == "error" and not self.parts and not self.segments:
            return 0
        usage, _ = self.final_usage()
        return usage.input_tokens + usage.output_tokens
