"""The built-in fake provider: deterministic streams with no key, for development, tests and benchmarks.

``fake/echo`` streams the last user message back word by word. Options, in the model name's query string
(``fake/echo?gap_ms=50&tokens=200``) or in the request's ``options``:

- ``tokens``: stream this many tokens, cycling through the words;
- ``gap_ms``: pause between tokens; ``ttft_ms``: pause before the first;
- ``fail_after`` with ``fail``: after that many tokens raise a status error (``fail=500``), a ``timeout``
  or a ``connection`` error; ``fail_after=0`` fails before the first token;
- ``finish``: the finish reason (default ``stop``); ``usage=0``: report no usage.

Given tools and a choice that requires a call (``required``, or a named tool), and unless the last message
is a tool's result, it calls the named tool (else the first) with ``{}`` as arguments and finishes with
``tool_calls``: an agent's loop runs against it with no key. Otherwise tools are ignored.

Each stream leaves a ``FakeStreamRecord`` so tests can see when the gateway closed it.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qsl

from providers.base import (
    Attachment,
    Finish,
    FinishReason,
    ProviderConnectionError,
    ProviderError,
    ProviderRequest,
    ProviderStatusError,
    ProviderStream,
    ProviderTimeout,
    Pump,
    StreamBatch,
    ToolCallDelta,
    Usage,
)

_WORDS = re.compile(r"\S+\s*")
_RECORDS_KEPT = 256


@dataclass(slots=True)
class FakeStreamRecord:
    prompt: str
    opened_at: float = field(default_factory=time.monotonic)
    closed_at: float | None = None
    tokens_sent: int = 0
    outcome: str = "open"  # then "complete", "failed" or "closed" (closed by the caller before the end)
    closed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True, slots=True)
class FakeOptions:
    tokens: int | None = None
    gap_s: float = 0.0
    ttft_s: float = 0.0
    fail_after: int | None = None
    fail: str = "500"
    finish: str = "stop"
    usage: bool = True

    @classmethod
    def parse(cls, model: str, extra: dict[str, Any]) -> FakeOptions:
        raw: dict[str, Any] = dict(parse_qsl(model.partition("?")[2]))
        raw.update(extra)
        try:
            return cls(
                tokens=int(raw["tokens"]) if "tokens" in raw else None,
                gap_s=float(raw.get("gap_ms", 0)) / 1000,
                ttft_s=float(raw.get("ttft_ms", 0)) / 1000,
                fail_after=int(raw["fail_after"]) if "fail_after" in raw else None,
                fail=str(raw.get("fail", "500")),
                finish=str(raw.get("finish", "stop")),
                usage=str(raw.get("usage", "1")) not in ("0", "false"),
            )
        except ValueError as error:
            raise ProviderError(f"Bad fake model options: {error}") from None


def _failure(kind: str) -> ProviderError:
    if kind == "timeout":
        return ProviderTimeout("The fake provider timed out")
    if kind == "connection":
        return ProviderConnectionError("The fake provider dropped the connection")
    return ProviderStatusError(int(kind), f"The fake provider failed with status {kind}")


class FakeProvider:
    """Streams deterministic text, a token a batch; counts how many of its streams run at once."""

    name = "fake"
    models: tuple[str, ...] = ("echo",)
    has_credentials = True
    response_formats = frozenset({"json_object", "json_schema"})  # echoed as text all the same

    def __init__(self) -> None:
        self.records: deque[FakeStreamRecord] = deque(maxlen=_RECORDS_KEPT)
        self.running = 0
        self.max_running = 0

    def find(self, prompt: str) -> FakeStreamRecord:
        """The most recent stream whose last user message was ``prompt``."""
        return next(record for record in reversed(self.records) if record.prompt == prompt)

    def tokens_for(self, prompt: str, options: FakeOptions) -> list[str]:
        words = _WORDS.findall(prompt) or [prompt or "…"]
        if options.tokens is None:
            return words
        spaced = [word if word[-1].isspace() else word + " " for word in words]
        return [spaced[n % len(spaced)] for n in range(options.tokens)]

    async def aclose(self) -> None:
        pass

    def accepts(self, attachment: Attachment) -> bool:
        return True

    def stream(self, request: ProviderRequest) -> ProviderStream:
        return Pump(self._stream(request))

    async def _stream(self, request: ProviderRequest) -> AsyncGenerator[StreamBatch, None]:
        if request.tool_choice == "required" and request.tools and request.messages[-1].role != "tool":
            name = request.forced_tool or request.tools[0].name
            yield [ToolCallDelta(0, f"call_{uuid.uuid4().hex[:24]}", name, "{}"),
                   Usage(max(1, request.prompt_chars // 4), 1), Finish("tool_calls")]
            return
        options = FakeOptions.parse(request.model, request.options)
        prompt = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
        tokens = self.tokens_for(prompt, options)
        record = FakeStreamRecord(prompt)
        self.records.append(record)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            if options.ttft_s:
                await asyncio.sleep(options.ttft_s)
            for index, token in enumerate(tokens):
                if index == options.fail_after:
                    record.outcome = "failed"
                    raise _failure(options.fail)
                if index and options.gap_s:
                    await asyncio.sleep(options.gap_s)
                cut = min((token.find(s) for s in request.stop if s in token), default=-1)
                if cut >= 0:  # a stop sequence ends the reply before it
                    if cut:
                        yield [token[:cut]]
                    break
                yield [token]
                record.tokens_sent += 1
            if options.fail_after is not None and options.fail_after >= len(tokens):
                record.outcome = "failed"
                raise _failure(options.fail)
            ending: StreamBatch = [Finish(cast(FinishReason, options.finish))]
            if options.usage:
                ending.insert(0, Usage(input_tokens=max(1, request.prompt_chars // 4), output_tokens=len(tokens)))
            yield ending
            record.outcome = "complete"
        finally:
            if record.outcome == "open":
                record.outcome = "closed"
            record.closed_at = time.monotonic()
            record.closed.set()
            self.running -= 1
