"""The adapter Protocol every provider implements, its events and its errors.

An adapter translates one vendor's wire format and nothing else: the gateway owns persistence, quotas,
pings, timeouts and cancellation. ``stream`` is an async generator of event batches; closing it (``aclose``
or cancelling the task that awaits it) must close the upstream connection at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Role = Literal["system", "user", "assistant"]

# The models each vendor is known to serve, for /v1/models (any other name is passed through as is).
OPENAI_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1", "gpt-4.1-mini", "o4-mini")
ANTHROPIC_MODELS = ("claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1")
GEMINI_MODELS = ("gemini-2.5-flash", "gemini-2.5-pro", "gemini-2.5-flash-lite")
FinishReason = Literal["stop", "length", "content_filter", "tool_calls", "error"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str


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

    @property
    def prompt_chars(self) -> int:
        """The prompt's size in characters: the system prompt and every message."""
        return sum(len(m.content) for m in self.messages) + len(self.system or "")


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """How an adapter's HTTP client reaches its vendor: timeouts (the idle one is between two reads of the
    stream, so it bounds a stall without a timer per token) and the size of its connection pool."""

    connect_timeout_s: float = 10.0
    idle_timeout_s: float = 60.0
    max_connections: int = 10_000


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts so far; a later Usage replaces an earlier one (vendors report running totals)."""

    input_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class Finish:
    reason: FinishReason


# The closed union of what an adapter yields. A text delta is a plain ``str``: it is by far the most
# frequent event, and a bare string costs no allocation beyond the text itself.
StreamEvent = str | Usage | Finish
# What ``stream`` yields: the events one read from the vendor carried, in order. A read of an unpaced
# stream holds dozens of deltas; taking them together lets the gateway write all their frames in one send
# instead of one send (and one system call) per token.
StreamBatch = list[StreamEvent]


class Provider(Protocol):
    """A model vendor: ``stream`` yields batches of text deltas, then usage (when known) and a finish."""

    name: str
    models: tuple[str, ...]  # the models it is known to serve, for /v1/models
    has_credentials: bool

    def stream(self, request: ProviderRequest) -> AsyncIterator[StreamBatch]: ...

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
    pass


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
