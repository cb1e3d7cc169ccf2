"""Reading a kept turn (storage/tapes.py): a resumer's stream, and the reply a dead turn's frames hold.

A resumer gets the turn's frames after the one it names, as they were first written, then follows the
live turn until its last frame. When the turn's instance dies (its live key lapses with no end kept), the
reader ends the turn itself with ``error interrupted``, once for all its readers.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import orjson
from redis.exceptions import RedisError
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.streaming.sse import RAW_HEADERS, encode_event
from gateway.streaming.turns import Interrupted, call_input
from gateway.streaming.writer import PING
from storage.tapes import Entry, Tapes

logger = logging.getLogger("gateway.streaming.replay")


def is_chat(data: bytes) -> bool:
    """Whether kept frames are chat events (numbered), not the AI SDK's chunks."""
    return data.startswith(b"id: ")


def frames_after(data: bytes, after: int) -> bytes:
    """The chat events in ``data`` numbered past ``after``."""
    frames = data.split(b"\n\n")
    kept = [frame for frame in frames if frame and int(frame[4:frame.index(b"\n")]) > after]
    return b"".join(frame + b"\n\n" for frame in kept)


def lost_frame(entries: list[Entry], seq: int) -> bytes:
    """The frame that ends a turn whose instance died, in its frames' format (number ``seq``)."""
    error = Interrupted()
    if entries and is_chat(entries[0][1].get(b"d", b"")):
        return encode_event(seq, "error", {"code": error.code, "message": error.message})
    return b"data: " + orjson.dumps({"type": "error", "errorText": error.message}) + b"\n\ndata: [DONE]\n\n"


class _Parts:
    """A reply's parts rebuilt from its frames, in stream order (as ``Turn.stored_parts`` makes them)."""

    def __init__(self) -> None:
        self.parts: list[dict[str, Any]] = []
        self.arguments: dict[str, list[str]] = {}
        self.calls: dict[str, dict[str, Any]] = {}
        self.texts: list[str] = []

    def add(self, kind: str, text: str) -> None:
        if not text:
            return
        if kind == "text":
            self.texts.append(text)
        last = self.parts[-1] if self.parts else None
        if last is not None and last["type"] == kind:
            last["text"] += text
        else:
            self.parts.append({"type": kind, "text": text})

    def call(self, call_id: str, name: str) -> None:
        if call_id not in self.calls:
            self.calls[call_id] = {"type": "tool-call", "tool_call_id": call_id, "tool_name": name, "input": {}}
            self.arguments[call_id] = []
            self.parts.append(self.calls[call_id])

    def call_arguments(self, call_id: str, arguments: str) -> None:
        if call_id in self.arguments:
            self.arguments[call_id].append(arguments)

    def call_done(self, call_id: str, name: str, value: Any, problem: str | None) -> None:
        self.call(call_id, name)
        self.calls[call_id]["input"] = value
        if problem is not None:
            self.calls[call_id]["input_error"] = problem
        del self.arguments[call_id]

    def reply(self) -> tuple[str, list[dict[str, Any]] | None]:
        for call_id, pieces in self.arguments.items():  # calls cut off mid-way: their arguments so far
            value, problem = call_input("".join(pieces))
            self.calls[call_id]["input"] = value
            if problem is not None:
                self.calls[call_id]["input_error"] = problem
        content = "".join(self.texts)
        if all(part["type"] == "text" for part in self.parts):
            return content, None
        return content, self.parts


def kept_reply(entries: list[Entry]) -> tuple[str, list[dict[str, Any]] | None]:
    """The text (and, with reasoning or tool calls, the parts) a turn's kept frames hold."""
    parts = _Parts()
    for _, fields in entries:
        data = fields.get(b"d", b"")
        for frame in data.split(b"\n\n"):
            if frame.startswith(b"id: "):
                _chat_event(parts, frame)
            elif frame.startswith(b"data: {"):
                _ui_chunk(parts, orjson.loads(frame[6:]))
    return parts.reply()


def _chat_event(parts: _Parts, frame: bytes) -> None:
    _, name_line, data_line = frame.split(b"\n", 2)
    name = name_line[7:]
    if name not in (b"delta", b"reasoning", b"tool_call_start", b"tool_call_delta", b"tool_call"):
        return
    data = orjson.loads(data_line[6:])
    if name == b"delta":
        parts.add("text", data["text"])
    elif name == b"reasoning":
        parts.add("reasoning", data["text"])
    elif name == b"tool_call_start":
        parts.call(data["id"], data["name"])
    elif name == b"tool_call_delta":
        parts.call_arguments(data["id"], data["arguments"])
    else:
        parts.call_done(data["id"], data["name"], data["input"], data.get("input_error"))


def _ui_chunk(parts: _Parts, chunk: dict[str, Any]) -> None:
    kind = chunk.get("type")
    if kind == "text-delta":
        parts.add("text", chunk["delta"])
    elif kind == "reasoning-delta":
        parts.add("reasoning", chunk["delta"])
    elif kind == "tool-input-start":
        parts.call(chunk["toolCallId"], chunk["toolName"])
    elif kind == "tool-input-delta":
        parts.call_arguments(chunk["toolCallId"], chunk["inputTextDelta"])
    elif kind in ("tool-input-available", "tool-input-error"):
        parts.call_done(chunk["toolCallId"], chunk["toolName"], chunk["input"], chunk.get("errorText"))


class Replay(Response):
    """A resumer's stream of a kept turn: ``entries`` (read at once, frames past ``after``), then the live
    ones until the turn's last frame. A send stuck for ``send_timeout_s`` (a reader that stopped reading)
    ends this reader alone; its hanging up ends nothing else."""

    def __init__(self, tapes: Tapes, key: str, reader: str, after: int, entries: list[Entry],
                 headers: dict[str, str], ping_s: float, send_timeout_s: float, lost_s: float) -> None:
        self.tapes, self.key, self.reader = tapes, key, reader
        self.after, self.entries = after, entries
        self.background = None
        self.raw_headers = RAW_HEADERS + [(k.lower().encode("latin-1"), v.encode("latin-1"))
                                            for k, v in headers.items()]
        self.ping_s, self.send_timeout_s = ping_s, send_timeout_s
        self.lost_s = lost_s  # how often a quiet turn's instance is checked on

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        gone = False

        async def listen() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            task.cancel()

        listener = asyncio.ensure_future(listen())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            await self._relay(send)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone or task.uncancel() > 0:
                raise
        except (OSError, RuntimeError, TimeoutError):
            pass  # the reader's connection failed, or it stopped reading
        except RedisError:
            logger.warning("a resumer's reads failed; its stream ends", exc_info=True)
        finally:
            listener.cancel()
            await self.tapes.leave(self.reader)

    async def _relay(self, send: Send) -> None:
        loop = asyncio.get_running_loop()
        entries, last, first = self.entries, self.after, True
        quiet_since = loop.time()
        while True:
            for seq, fields in entries:
                data = fields.get(b"d", b"")
                if first and is_chat(data):
                    data = frames_after(data, last)
                first = False
                if data:
                    await asyncio.wait_for(self._send(send, data), self.send_timeout_s)
                    quiet_since = loop.time()
                last = seq
                if b"e" in fields:
                    return
            entries = await self.tapes.follow(self.key, last, self.lost_s)
            if entries:
                continue
            if loop.time() - quiet_since >= self.ping_s:
                await asyncio.wait_for(self._send(send, PING), self.send_timeout_s)
                quiet_since = loop.time()
            if not await self.tapes.alive(self.key):
                _, entries = await self.tapes.read(self.key, last)
                if not entries:  # its instance is gone and left no end: the turn ends here for everyone
                    _, kept = await self.tapes.read(self.key, 0)
                    await self.tapes.end_lost(self.key, last + 1, lost_frame(kept, last + 1))
                    _, entries = await self.tapes.read(self.key, last)
                    if not entries:  # nothing kept any more
                        return

    @staticmethod
    async def _send(send: Send, data: bytes) -> None:
        await send({"type": "http.response.body", "body": data, "more_body": True})


def new_reader() -> str:
    return uuid.uuid4().hex
