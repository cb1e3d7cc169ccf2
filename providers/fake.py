"""The built-in fake provider: deterministic streams with no key, for development, tests and benchmarks.

``fake/echo`` streams the last user message back word by word. ``fake/think`` reasons first: it streams
``Thinking about: <the message>`` (its first ``THINK_WORDS`` words) as reasoning deltas, the last one signed
``FAKE_SIGNATURE``, then answers as echo does, its usage counting the reasoning in ``reasoning_tokens`` (and
in the output). Options, the same for both, in the model name's query string
(``fake/echo?gap_ms=50&tokens=200``) or in the request's ``options``:

- ``tokens``, 0..100000: stream this many tokens, cycling through the words (unset: the words once);
- ``gap_ms``, 0..60000: pause between tokens; ``ttft_ms``, 0..60000: pause before the first;
- ``fail_after``, 0..100000, with ``fail``, a status 400..599 (default ``500``), ``timeout`` or
  ``connection``: fail after that many tokens of the answer (0: before the first; past the reply's end: after
  its last);
- ``finish``, one of ``stop`` (default), ``length``, ``content_filter``, ``tool_calls``: the finish reason;
- ``usage``, ``1``, ``0``, ``true`` or ``false``: ``0`` reports no usage.

Anything else (another option, a value out of its range, a repeated option, a model other than ``echo``
or ``think``) is refused by ``check_model``, before the gateway reserves anything: the options are what a
caller controls, so each is bounded (a label on /metrics, a row's CHECK, the event loop and memory all see
them).

Like a real vendor it stops at the request's ``max_tokens`` (the answer's tokens; the reasoning is not
counted), finishing with ``length`` when that cut the reply short. The reply is made a token at a time,
never held whole; unpaced, it goes out ``BATCH_TOKENS`` tokens a batch with a turn of the event loop between
batches, so the largest reply allowed does not hold the loop (paced, a token a batch, ``gap_ms`` apart; the
reasoning the same way, before it).

Given tools and a choice that requires a call (``required``, or a named tool), and unless the last message
is a tool's result, it calls the named tool (else the first) with ``{}`` as arguments and finishes with
``tool_calls`` (``fake/think`` reasons first): an agent's loop runs against it with no key. Otherwise tools
are ignored.

Each stream leaves a ``FakeStreamRecord`` so tests can see when the gateway closed it.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from providers.base import (
    Attachment,
    Finish,
    FinishReason,
    InvalidModelOptions,
    ProviderConnectionError,
    ProviderError,
    ProviderRequest,
    ProviderStatusError,
    ProviderStream,
    ProviderTimeout,
    Pump,
    ReasoningDelta,
    StreamBatch,
    ToolCallDelta,
    UnknownModel,
    Usage,
    failed,
)

_WORDS = re.compile(r"\S+\s*")
_DIGITS = re.compile(r"[0-9]{1,7}")  # ASCII only, and short: int() of thousands of digits is slow, then refused
_RECORDS_KEPT = 256

MAX_REPLY_TOKENS = 100_000
MAX_WAIT_MS = 60_000
# The integer options and the largest value each takes.
_LIMITS = {"tokens": MAX_REPLY_TOKENS, "gap_ms": MAX_WAIT_MS, "ttft_ms": MAX_WAIT_MS, "fail_after": MAX_REPLY_TOKENS}
FINISHES: tuple[FinishReason, ...] = ("stop", "length", "content_filter", "tool_calls")
_FAILURES = ("timeout", "connection")  # or a status, 400..599
_FLAGS = {"1": True, "true": True, "0": False, "false": False}
OPTION_NAMES = (*_LIMITS, "fail", "finish", "usage")
# fake/think's reasoning: at most this many words, the last delta signed with this.
THINK_WORDS = 32
FAKE_SIGNATURE = "fake-think-signature"
# Unpaced, tokens go out this many a batch: enough that a batch's frames share one send, few enough that
# the event loop gets a turn every fraction of a millisecond.
BATCH_TOKENS = 64


@dataclass(slots=True)
class FakeStreamRecord:
    """What a test sees of one stream: when it opened and closed, how many tokens went out, how it ended."""

    prompt: str
    opened_at: float = field(default_factory=time.monotonic)
    closed_at: float | None = None
    tokens_sent: int = 0
    outcome: str = "open"  # then "complete", "failed" or "closed" (closed by the caller before the end)
    closed: asyncio.Event = field(default_factory=asyncio.Event)


def _shown(value: object) -> str:
    """A caller's value, quoted and cut short, for an error message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _integer(name: str, value: object) -> int:
    high = _LIMITS[name]
    text = str(value)
    if _DIGITS.fullmatch(text) is None or int(text) > high:
        raise InvalidModelOptions(f"fake option {name} must be an integer from 0 to {high}, not {_shown(value)}")
    return int(text)


def _failure_kind(value: object) -> str:
    text = str(value)
    if text in _FAILURES:
        return text
    if _DIGITS.fullmatch(text) is not None and 400 <= int(text) <= 599:
        return str(int(text))
    raise InvalidModelOptions(
        f"fake option fail must be a status from 400 to 599, timeout or connection, not {_shown(value)}"
    )


def _finish(value: object) -> FinishReason:
    if value not in FINISHES:
        raise InvalidModelOptions(f"fake option finish must be one of {', '.join(FINISHES)}, not {_shown(value)}")
    return value


def _flag(name: str, value: object) -> bool:
    flag = _FLAGS.get(str(value).lower())
    if flag is None:
        raise InvalidModelOptions(f"fake option {name} must be 1, 0, true or false, not {_shown(value)}")
    return flag


def _options_in(model: str, extra: Mapping[str, Any]) -> dict[str, object]:
    """The options a call names: the model name's query string, then ``extra`` (a request's ``options``),
    which wins. An option repeated in the query string is refused: which one would count is a guess."""
    raw: dict[str, object] = {}
    for name, value in parse_qsl(model.partition("?")[2], keep_blank_values=True):
        if name in raw:
            raise InvalidModelOptions(f"fake option {_shown(name)} is given twice")
        raw[name] = value
    raw.update(extra)
    unknown = next((name for name in raw if name not in OPTION_NAMES), None)
    if unknown is not None:
        raise InvalidModelOptions(f"unknown fake option {_shown(unknown)}: the options are {', '.join(OPTION_NAMES)}")
    return raw


@dataclass(frozen=True, slots=True)
class FakeOptions:
    """A fake stream's options, each within its range (see the module's docstring)."""

    tokens: int | None = None
    gap_s: float = 0.0
    ttft_s: float = 0.0
    fail_after: int | None = None
    fail: str = "500"
    finish: FinishReason = "stop"
    usage: bool = True

    @classmethod
    def parse(cls, model: str, extra: Mapping[str, Any]) -> FakeOptions:
        """The options of ``model``'s query string and ``extra``; InvalidModelOptions names a bad one."""
        raw = _options_in(model, extra)
        numbers = {name: _integer(name, raw[name]) for name in _LIMITS if name in raw}
        return cls(
            tokens=numbers.get("tokens"),
            gap_s=numbers.get("gap_ms", 0) / 1000,
            ttft_s=numbers.get("ttft_ms", 0) / 1000,
            fail_after=numbers.get("fail_after"),
            fail=_failure_kind(raw.get("fail", "500")),
            finish=_finish(raw.get("finish", "stop")),
            usage=_flag("usage", raw.get("usage", "1")),
        )


def _failure(kind: str) -> ProviderError:
    if kind == "timeout":
        return ProviderTimeout("The fake provider timed out")
    if kind == "connection":
        return ProviderConnectionError("The fake provider dropped the connection")
    return ProviderStatusError(int(kind), f"The fake provider failed with status {kind}")


def _capped(tokens: Iterator[str], max_tokens: int | None, fail_after: int | None) -> Iterator[str]:
    """The tokens that go out: no more than ``max_tokens`` (a vendor's cap), none from ``fail_after`` on."""
    for limit in (max_tokens, fail_after):
        if limit is not None:
            tokens = itertools.islice(tokens, limit)
    return tokens


def _take(tokens: Iterator[str], size: int, stop: tuple[str, ...]) -> tuple[StreamBatch, bool]:
    """Up to ``size`` of ``tokens``, and whether a stop sequence ended the reply among them (the text before
    it, in its token, kept)."""
    batch: StreamBatch = []
    for token in itertools.islice(tokens, size):
        cut = min((token.find(s) for s in stop if s in token), default=-1) if stop else -1
        if cut >= 0:
            if cut:
                batch.append(token[:cut])
            return batch, True
        batch.append(token)
    return batch, False


def _usage(request: ProviderRequest, sent: int, reasoning: StreamBatch) -> Usage:
    """A vendor's usage: ``sent`` answer tokens, and the reasoning's (when there was any) counted in the
    output too."""
    return Usage(max(1, request.prompt_chars // 4), sent + len(reasoning), len(reasoning) or None)


def _ending(
    request: ProviderRequest, options: FakeOptions, sent: int, cut_short: bool, reasoning: StreamBatch
) -> StreamBatch:
    """Usage (unless ``usage=0``) and the finish: ``length`` when ``max_tokens`` cut the reply short."""
    ending: StreamBatch = [Finish("length" if cut_short else options.finish)]
    if options.usage:
        ending.insert(0, _usage(request, sent, reasoning))
    return ending


def _tool_call(request: ProviderRequest, reasoning: StreamBatch) -> StreamBatch:
    name = request.forced_tool or request.tools[0].name
    return [*reasoning, ToolCallDelta(0, f"call_{uuid.uuid4().hex[:24]}", name, "{}"),
            _usage(request, 1, reasoning), Finish("tool_calls")]


def _reasoning(prompt: str) -> StreamBatch:
    """fake/think's reasoning about ``prompt``: a delta a word, the last one signed."""
    words = list(itertools.islice(_WORDS.finditer(f"Thinking about: {prompt}"), THINK_WORDS))
    deltas: StreamBatch = [ReasoningDelta(word.group()) for word in words[:-1]]
    return [*deltas, ReasoningDelta(words[-1].group(), signature=FAKE_SIGNATURE)]


def _batches(events: StreamBatch, paced: bool) -> list[StreamBatch]:
    """``events`` as batches: one, or, paced, an event a batch; none for no events."""
    if paced:
        return [[event] for event in events]
    return [events] if events else []


class FakeProvider:
    """Streams deterministic text; counts how many of its streams run at once."""

    name = "fake"
    models: tuple[str, ...] = ("echo", "think")
    has_credentials = True
    response_formats = frozenset({"json_object", "json_schema"})  # echoed as text all the same

    def __init__(self) -> None:
        self.records: deque[FakeStreamRecord] = deque(maxlen=_RECORDS_KEPT)
        self.running = 0
        self.max_running = 0

    def find(self, prompt: str) -> FakeStreamRecord:
        """The most recent stream whose last user message was ``prompt``."""
        return next(record for record in reversed(self.records) if record.prompt == prompt)

    def check_model(self, model: str) -> None:
        """A model of ``models`` with options in their ranges; called before anything is reserved."""
        self._check_name(model)
        FakeOptions.parse(model, {})

    def _check_name(self, model: str) -> None:
        name = model.partition("?")[0]
        if name not in self.models:
            raise UnknownModel(f"Unknown model {_shown('fake/' + name)}: the fake serves {', '.join(self.models)}")

    def tokens_for(self, prompt: str, options: FakeOptions) -> Iterator[str]:
        """The reply's tokens, made as they are taken: the prompt's words, or ``options.tokens`` of them,
        cycling."""
        words = _WORDS.findall(prompt) or [prompt or "…"]
        if options.tokens is None:
            return iter(words)
        spaced = [word if word[-1].isspace() else word + " " for word in words]
        return itertools.islice(itertools.cycle(spaced), options.tokens)

    async def aclose(self) -> None:
        pass

    def accepts(self, attachment: Attachment) -> bool:
        return True

    def stream(self, request: ProviderRequest) -> ProviderStream:
        """The reply to ``request``; options the gateway did not check (``request.options``) that are bad
        fail the stream, as a vendor refusing the call would."""
        try:
            self._check_name(request.model)
            options = FakeOptions.parse(request.model, request.options)
        except (UnknownModel, InvalidModelOptions) as error:
            return failed(ProviderError(str(error)))
        return Pump(self._stream(request, options))

    async def _stream(self, request: ProviderRequest, options: FakeOptions) -> AsyncGenerator[StreamBatch, None]:
        prompt = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
        reasoning = _reasoning(prompt) if request.model.partition("?")[0] == "think" else []
        if request.tool_choice == "required" and request.tools and request.messages[-1].role != "tool":
            yield _tool_call(request, reasoning)
            return
        record = self._open(prompt)
        try:
            if options.ttft_s:
                await asyncio.sleep(options.ttft_s)
            for n, thought in enumerate(_batches(reasoning, paced=bool(options.gap_s))):
                if n:
                    await asyncio.sleep(options.gap_s)
                yield thought
            tokens = self.tokens_for(prompt, options)
            sending = _capped(tokens, request.max_tokens, options.fail_after)
            size = 1 if options.gap_s else BATCH_TOKENS
            while True:
                batch, by_stop = _take(sending, size, request.stop)
                if batch:
                    if record.tokens_sent or reasoning:  # a pause (or, unpaced, a loop's turn) between batches
                        await asyncio.sleep(options.gap_s)
                    yield batch
                    record.tokens_sent += len(batch)
                if by_stop or len(batch) < size:
                    break
            if options.fail_after is not None:
                record.outcome = "failed"
                raise _failure(options.fail)
            cut_short = not by_stop and request.max_tokens is not None and next(tokens, None) is not None
            yield _ending(request, options, record.tokens_sent, cut_short, reasoning)
            record.outcome = "complete"
        finally:
            self._close(record)

    def _open(self, prompt: str) -> FakeStreamRecord:
        record = FakeStreamRecord(prompt)
        self.records.append(record)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        return record

    def _close(self, record: FakeStreamRecord) -> None:
        if record.outcome == "open":
            record.outcome = "closed"
        record.closed_at = time.monotonic()
        record.closed.set()
        self.running -= 1
