"""The adapter Protocol every provider implements, its events and its errors.

An adapter translates one vendor's wire format and nothing else: the gateway owns persistence, quotas,
pings, timeouts and cancellation. ``stream`` returns a ``ProviderStream``: an async iterator of event
batches that can be switched to pushing them into a ``BatchSink``; closing it (``close``, ``aclose`` or
cancelling the task that awaits it) must close the upstream connection at once.

Past 400 lines because it is the vocabulary every adapter shares: the request, its events and its
errors, each a few lines, apart from which no adapter can be read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

logger = logging.getLogger("providers")

Role = Literal["system", "user", "assistant", "tool"]

# The models each vendor is known to serve, for /v1/models (any other name is passed through as is).
OPENAI_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1", "gpt-4.1-mini", "o4-mini")
ANTHROPIC_MODELS = ("claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1")
GEMINI_MODELS = ("gemini-2.5-flash", "gemini-2.5-pro", "gemini-2.5-flash-lite")
FinishReason = Literal["stop", "length", "content_filter", "tool_calls", "error"]
ReasoningEffort = Literal["minimal", "low", "medium", "high"]
# The thinking budget, in tokens, each effort stands for at the vendors that take a budget (Anthropic,
# Gemini). Each is at least Anthropic's floor (1,024) and at most Gemini 2.5 Flash's ceiling (24,576).
REASONING_BUDGETS: dict[ReasoningEffort, int] = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 24576}

IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
ATTACHMENT_TYPES = (*IMAGE_TYPES, "application/pdf")
# What one attachment counts for in a prompt's size (for quota estimates and the history window): about
# 1,600 tokens, what a vendor charges for a large image. The settled usage is the vendor's own count.
ATTACHMENT_CHARS = 6_400


@dataclass(frozen=True, slots=True)
class Attachment:
    """A file the model sees beside a message's text: an image or a PDF (``ATTACHMENT_TYPES``), by an
    http(s) link the vendor fetches or by a ``data:<media type>;base64,...`` URL carrying it."""

    name: str
    media_type: str
    url: str

    @property
    def data(self) -> str | None:
        """The base64 payload of a data URL; None for a link."""
        if self.url.startswith("data:"):
            return self.url.partition(",")[2]
        return None


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call: its name, what it does, and its parameters as a JSON Schema."""

    name: str
    description: str | None
    parameters: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the model made, in an earlier assistant message: ``arguments`` is JSON text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """The answer must be JSON: any object (``json_object``) or one matching ``schema`` (``json_schema``)."""

    kind: Literal["json_object", "json_schema"]
    schema: dict[str, Any] | None = None
    name: str = "response"
    strict: bool | None = None


@dataclass(frozen=True, slots=True)
class Reasoning:
    """A piece of an earlier assistant turn's reasoning, kept so each adapter can send it back in its
    vendor's form: the reasoning ``text``, the vendor's opaque ``signature`` for it, or, for a block the
    vendor redacted, its encrypted ``redacted`` data (the text then empty). What it is in each vendor:

    - Anthropic: a ``thinking`` block (text and signature; one without a signature is not sent back) or a
      ``redacted_thinking`` block (``redacted``), sent before the turn's text and ``tool_use`` blocks;
    - Gemini: a ``thought`` part (text, and its ``thoughtSignature`` if it had one); a signature without
      text came on an answer part and goes back on it: the first ``functionCall`` part of the turn, or,
      with no calls, its last text part (where Gemini puts it);
    - OpenAI and compatible servers: not sent back (Chat Completions has no field for it).

    A signature is only good at the vendor that made it: the caller passes reasoning to the provider that
    made the turn, not to another."""

    text: str
    signature: str | None = None
    redacted: str | None = None


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """A message of the conversation. An assistant's may hold ``tool_calls`` and the ``reasoning`` it
    came with (in stream order); a ``tool`` message is the result of the call named by ``tool_call_id``,
    its ``content`` the result as text."""

    role: Role
    content: str
    attachments: tuple[Attachment, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    reasoning: tuple[Reasoning, ...] = ()


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    """One call to a model: ``model`` is the name after the ``provider/`` prefix."""

    model: str
    messages: list[ChatMessage]
    system: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    tools: tuple[Tool, ...] = ()
    tool_choice: Literal["auto", "none", "required"] | None = None  # None: the vendor's default (auto)
    forced_tool: str | None = None  # with "required": the one tool the model must call
    response_format: ResponseFormat | None = None
    reasoning_effort: ReasoningEffort | None = None  # None: the vendor's default (no reasoning shown)

    @property
    def prompt_chars(self) -> int:
        """The prompt's size in characters: the system prompt, every message (with the reasoning sent back)
        and the tools' definitions."""
        chars = sum(len(m.content) + len(m.attachments) * ATTACHMENT_CHARS for m in self.messages)
        chars += sum(len(c.arguments) for m in self.messages for c in m.tool_calls)
        chars += sum(len(r.text) for m in self.messages for r in m.reasoning)
        chars += sum(len(t.name) + len(t.description or "") + len(str(t.parameters)) for t in self.tools)
        return chars + len(self.system or "")


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """How an adapter's HTTP client reaches its vendor: timeouts (the idle one is between two reads of the
    stream, so it bounds a stall without a timer per token) and the size of its connection pool."""

    connect_timeout_s: float = 10.0
    idle_timeout_s: float = 60.0
    max_connections: int = 10_000


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts so far; a later Usage replaces an earlier one (vendors report running totals).
    ``output_tokens`` includes any reasoning; ``reasoning_tokens`` is how much of it was reasoning, when the
    vendor says (OpenAI, Gemini; Anthropic reports no separate count)."""

    input_tokens: int
    output_tokens: int
    reasoning_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Finish:
    reason: FinishReason


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of a tool call as it streams: the first piece of call ``index`` has its ``id`` and ``name``,
    every piece a fragment of its JSON ``arguments``."""

    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """A piece of the model's reasoning as it streams, before (or between) the answer's text and tool calls.

    ``text`` is the next fragment of reasoning; ``signature`` the vendor's opaque signature, which has to go
    back with the reasoning in a later request (``Reasoning``); ``redacted`` the encrypted data of a block
    the vendor redacted (Anthropic's ``redacted_thinking``; text empty).

    Consecutive deltas make one piece of reasoning (one ``Reasoning`` in history): each adds its text, and
    one with a signature ends the piece (Anthropic sends a block's signature after its text). A text delta
    or a tool call ends it too, and a delta with ``redacted`` is a piece of its own. Gemini also puts
    signatures on parts that are not thoughts: such a signature comes as a delta with no text right after
    that part's text or tool call, so it is a piece of its own (``Reasoning`` says where it goes back)."""

    text: str
    signature: str | None = None
    redacted: str | None = None


# The closed union of what an adapter yields: text, reasoning, tool-call pieces, usage and the finish. A
# text delta is a plain ``str``: it is by far the most frequent event, and a bare string costs no
# allocation beyond the text itself.
StreamEvent = str | ReasoningDelta | Usage | Finish | ToolCallDelta
# What ``stream`` yields: the events one read from the vendor carried, in order. A read of an unpaced
# stream holds dozens of deltas; taking them together lets the gateway write all their frames in one send
# instead of one send (and one system call) per token.
StreamBatch = list[StreamEvent]


class BatchSink(Protocol):
    """Where a relayed stream's batches go, from whatever callback read them."""

    def deliver(self, batch: StreamBatch) -> None: ...

    def ended(self, failure: ProviderError | None) -> None:
        """Called once, after the last batch: the stream completed (None) or failed."""


class ProviderStream(Protocol):
    """One call's answer. Pulled (``async for``) it yields batches; ``relay`` then hands every later batch to
    a sink as it arrives, so a stream that relays costs no task step per network read."""

    def __aiter__(self) -> ProviderStream: ...

    async def __anext__(self) -> StreamBatch: ...

    def relay(self, sink: BatchSink) -> None: ...

    def pause(self) -> None:
        """Stop reading the vendor for now (the client is not keeping up)."""

    def resume(self) -> None: ...

    def close(self) -> None:
        """Abandon the call at once: no more batches, no ``ended``, the connection closed."""

    async def aclose(self) -> None: ...


class Pump:
    """A ProviderStream over an async generator of batches, relayed by a task that pulls them."""

    def __init__(self, batches: AsyncGenerator[StreamBatch, None]) -> None:
        self._batches = batches
        self._task: asyncio.Task[None] | None = None
        self._paused: asyncio.Future[None] | None = None  # set while the sink cannot take more

    def __aiter__(self) -> Pump:
        return self

    async def __anext__(self) -> StreamBatch:
        return await anext(self._batches)

    def relay(self, sink: BatchSink) -> None:
        self._task = asyncio.get_running_loop().create_task(self._pump(sink))

    async def _pump(self, sink: BatchSink) -> None:
        try:
            async for batch in self._batches:
                sink.deliver(batch)
                if self._paused is not None:
                    await self._paused
        except ProviderError as failure:
            sink.ended(failure)
            return
        except Exception:
            logger.exception("a provider stream failed")
            sink.ended(ProviderError())
            return
        sink.ended(None)

    def pause(self) -> None:
        if self._paused is None:
            self._paused = asyncio.get_running_loop().create_future()

    def resume(self) -> None:
        paused, self._paused = self._paused, None
        if paused is not None and not paused.done():
            paused.set_result(None)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._batches.aclose()


def omitted(attachment: Attachment) -> str:
    """The note that stands, in a message's text, for an attachment the vendor cannot take."""
    return f"[attachment {attachment.name!r} ({attachment.media_type}) is not shown to this model]"


async def _raising(failure: ProviderError) -> AsyncGenerator[StreamBatch, None]:
    raise failure
    yield []  # an async generator that fails on its first step


def failed(failure: ProviderError) -> Pump:
    """A stream whose first read raises ``failure`` (a call refused before it was made)."""
    return Pump(_raising(failure))


class Provider(Protocol):
    """A model vendor: its streams yield batches of reasoning, text and tool-call deltas, then usage (when
    known) and a finish."""

    name: str
    models: tuple[str, ...]  # the models it is known to serve, for /v1/models
    has_credentials: bool

    @property
    def response_formats(self) -> frozenset[str]:
        """The ResponseFormat kinds the vendor can hold an answer to."""

    def stream(self, request: ProviderRequest) -> ProviderStream: ...

    def check_model(self, model: str) -> None:
        """Raise UnknownModel for a name this provider cannot serve, InvalidModelOptions for options it
        refuses; called before anything is reserved (vendors: ``check_model_id``)."""

    def accepts(self, attachment: Attachment) -> bool:
        """Whether the vendor can take ``attachment`` the way it is given (in a past message, one it cannot
        take is named in the text instead)."""

    async def aclose(self) -> None:
        """Close the adapter's HTTP client (its pooled connections)."""


class ProviderError(Exception):
    """A provider call failed. ``code`` is stable and goes to clients; the message never holds secrets."""

    code = "upstream_error"
    http_status = 502
    retryable = False

    def __init__(
        self, message: str = "The model provider failed", *, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class ProviderStatusError(ProviderError):
    """The vendor answered with an error status."""

    def __init__(self, status: int, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message, retry_after=retry_after)
        self.status = status
        if status in (401, 403):
            self.code = "upstream_auth_failed"
        elif status == 429:
            self.code, self.retryable = "upstream_rate_limited", True
        elif status >= 500:
            self.code, self.retryable = (
                "upstream_unavailable" if status in (503, 529) else "upstream_error",
                True,
            )


class ProviderTimeout(ProviderError):
    code = "upstream_timeout"
    http_status = 504
    retryable = True


class ProviderConnectionError(ProviderError):
    code = "upstream_connection_failed"
    retryable = True


class ProviderProtocolError(ProviderError):
    """The vendor's stream could not be understood (malformed frame, oversized event)."""

    code = "upstream_protocol_error"


class UnknownModel(LookupError):
    """No provider serves this model name: a 404 ``model_not_found``."""


class InvalidModelOptions(ValueError):
    """The model name is known but its options are not (the fake's ``?tokens=...``): a 422 naming ``model``."""


def check_model_id(model: str) -> None:
    """A vendor's model id travels in a request body or, percent-encoded, in a URL path. One holding ``?``,
    ``#``, whitespace, a control character or a ``.``/``..`` segment names no model: raised as UnknownModel,
    before anything is reserved. A ``/`` inside it is legal (``Qwen/Qwen2.5-7B-Instruct``)."""
    if (not model or any(c in "?#" or c.isspace() or not c.isprintable() for c in model)
            or any(segment in ("", ".", "..") for segment in model.split("/"))):
        raise UnknownModel(f"Unknown model {model!r}")


def retry_after_of(headers: Any) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (delta seconds), when a vendor sends one."""
    for name, divisor in (("retry-after-ms", 1000), ("retry-after", 1)):
        value = headers.get(name) if headers is not None else None
        if value:
            try:
                return max(float(value) / divisor, 0.0)
            except ValueError:
                continue
    return None


def status_failure(vendor: str, status: int, body: object, headers: Any) -> ProviderStatusError:
    """A vendor's error status as our error. The vendor's own text is left out: it can echo key fragments."""
    kind = None
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            kind = error.get("type") or error.get("code") or error.get("status")
    detail = f" ({kind})" if isinstance(kind, str) and len(kind) < 80 else ""
    return ProviderStatusError(status, f"{vendor} answered {status}{detail}", retry_after=retry_after_of(headers))
