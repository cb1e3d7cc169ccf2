"""Anthropic Messages streaming through the official SDK (its ``client.post`` for a raw response, on its
aiohttp transport, as for OpenAI), read through our SSE decoder.

Events: ``message_start`` (input usage), ``content_block_delta`` (text), ``message_delta`` (stop reason and
the output usage, which is cumulative), ``message_stop``, ``ping`` and ``error``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx2
import orjson

from providers.base import (
    ANTHROPIC_MODELS,
    Finish,
    FinishReason,
    ProviderConnectionError,
    ProviderError,
    ProviderProtocolError,
    ProviderRequest,
    ProviderStatusError,
    ProviderTimeout,
    StreamEvent,
    UpstreamConfig,
    Usage,
    status_failure,
)
from providers.sse import SSEDecoder

VENDOR = "Anthropic"
DEFAULT_MAX_TOKENS = 4096  # the Messages API requires max_tokens
FINISH_REASONS: dict[str, FinishReason] = {
    "end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
    "refusal": "content_filter", "pause_turn": "stop",
}
# Mid-stream error types, as the HTTP status the same error has before a stream starts.
ERROR_STATUS = {"overloaded_error": 529, "rate_limit_error": 429, "api_error": 500, "timeout_error": 504}


def messages_body(request: ProviderRequest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": request.model, "max_tokens": request.max_tokens or DEFAULT_MAX_TOKENS, "stream": True,
        "messages": [{"role": m.role, "content": m.content} for m in request.messages if m.role != "system"],
    }
    if request.system:
        body["system"] = request.system
    if request.temperature is not None:
        body["temperature"] = min(request.temperature, 1.0)  # Anthropic's range is 0..1
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.stop:
        body["stop_sequences"] = list(request.stop)
    return body


class AnthropicProvider:
    def __init__(self, api_key: str | None, base_url: str | None, config: UpstreamConfig) -> None:
        self.name = "anthropic"
        self.models: tuple[str, ...] = ANTHROPIC_MODELS
        self.has_credentials = bool(api_key)
        self.client = anthropic.AsyncAnthropic(
            api_key=api_key or "no-key-configured", base_url=base_url, max_retries=0,
            http_client=anthropic.DefaultAioHttpClient(timeout=config.timeout(), limits=config.limits()),
        )

    async def aclose(self) -> None:
        await self.client.close()

    async def stream(self, request: ProviderRequest) -> AsyncIterator[StreamEvent]:
        if not self.has_credentials:
            raise ProviderStatusError(401, "No API key is configured for anthropic (ANTHROPIC_API_KEY)")
        try:
            response = await self.client.post(
                "/v1/messages", body=messages_body(request), cast_to=httpx2.Response, stream=True
            )
            try:
                async for event in self._events(response.aiter_bytes()):
                    yield event
            finally:
                await response.aclose()
        except anthropic.APIStatusError as error:
            raise status_failure(VENDOR, error.status_code, error.body, error.response.headers) from None
        except (anthropic.APITimeoutError, httpx2.TimeoutException):
            raise ProviderTimeout(f"{VENDOR} timed out") from None
        except (anthropic.APIConnectionError, httpx2.TransportError, httpx2.StreamError):
            raise ProviderConnectionError(f"The connection to {VENDOR} failed") from None

    async def _events(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[StreamEvent]:
        decoder = SSEDecoder()
        input_tokens = output_tokens = 0
        finish: FinishReason = "stop"
        async for chunk in chunks:
            for name, data in decoder.feed(chunk):
                if name == b"content_block_delta":
                    text = _frame(data)["delta"].get("text")
                    if text:
                        yield text
                elif name == b"message_start":
                    usage = _frame(data)["message"].get("usage") or {}
                    input_tokens = usage.get("input_tokens") or 0
                    output_tokens = usage.get("output_tokens") or 0
                elif name == b"message_delta":
                    frame = _frame(data)
                    reason = (frame.get("delta") or {}).get("stop_reason")
                    if reason:
                        finish = FINISH_REASONS.get(reason, "stop")
                    output_tokens = (frame.get("usage") or {}).get("output_tokens", output_tokens)
                elif name == b"message_stop":
                    yield Usage(input_tokens, output_tokens)
                    yield Finish(finish)
                    return
                elif name == b"error":
                    raise _stream_error(_frame(data))
        raise ProviderConnectionError(f"The {VENDOR} stream ended before it was complete")


def _frame(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ProviderProtocolError(f"{VENDOR} sent a malformed frame") from None


def _stream_error(frame: Any) -> ProviderError:
    kind = (frame.get("error") or {}).get("type", "error") if isinstance(frame, dict) else "error"
    status = ERROR_STATUS.get(kind)
    if status is None:
        return ProviderError(f"{VENDOR} reported an error mid-stream ({kind})")
    return ProviderStatusError(status, f"{VENDOR} reported {kind} mid-stream")
