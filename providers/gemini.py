"""Gemini's ``streamGenerateContent`` (``alt=sse``): a direct HTTP call built from google-genai's types.

google-genai parses the stream itself into one pydantic object per frame and offers no raw byte stream; its
line parser also rejects SSE comment lines. So the request body is assembled from the SDK's own request
types (``types.Content``, ``types.GenerationConfig``, dumped by their wire aliases) and sent with httpx2,
the SDK's HTTP library, and the stream is read through our SSE decoder and orjson like every other vendor.
docs/performance.md records the per-token cost of both ways.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx2
import orjson
from google.genai import types

from providers.base import (
    GEMINI_MODELS,
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

VENDOR = "Gemini"
DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
FINISH_REASONS: dict[str, FinishReason] = {
    "STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "content_filter", "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter", "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
}


def _wire(model: Any) -> Any:
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


def generate_body(request: ProviderRequest) -> dict[str, Any]:
    contents = [
        types.Content(role="model" if m.role == "assistant" else "user", parts=[types.Part(text=m.content)])
        for m in request.messages if m.role != "system"
    ]
    body: dict[str, Any] = {"contents": [_wire(c) for c in contents]}
    if request.system:
        body["systemInstruction"] = _wire(types.Content(parts=[types.Part(text=request.system)]))
    config = types.GenerationConfig(
        max_output_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
        stop_sequences=list(request.stop) or None,
    )
    if generation := _wire(config):
        body["generationConfig"] = generation
    return body


class GeminiProvider:
    def __init__(self, api_key: str | None, base_url: str | None, config: UpstreamConfig) -> None:
        self.name = "gemini"
        self.models: tuple[str, ...] = GEMINI_MODELS
        self.api_key = api_key
        self.has_credentials = bool(api_key)
        self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self.client = httpx2.AsyncClient(timeout=config.timeout(), limits=config.limits())

    async def aclose(self) -> None:
        await self.client.aclose()

    async def stream(self, request: ProviderRequest) -> AsyncIterator[StreamEvent]:
        if not self.has_credentials:
            raise ProviderStatusError(401, "No API key is configured for gemini (GEMINI_API_KEY)")
        url = f"{self.base_url}/v1beta/models/{request.model}:streamGenerateContent?alt=sse"
        headers = {"x-goog-api-key": self.api_key or "", "content-type": "application/json"}
        try:
            async with self.client.stream("POST", url, content=orjson.dumps(generate_body(request)),
                                          headers=headers) as response:
                if response.status_code >= 400:
                    body = await response.aread()
                    raise status_failure(VENDOR, response.status_code, _json_or_none(body), response.headers)
                async for event in self._events(response.aiter_bytes()):
                    yield event
        except httpx2.TimeoutException:
            raise ProviderTimeout(f"{VENDOR} timed out") from None
        except (httpx2.TransportError, httpx2.StreamError):
            raise ProviderConnectionError(f"The connection to {VENDOR} failed") from None

    async def _events(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[StreamEvent]:
        decoder = SSEDecoder()
        usage: dict[str, Any] | None = None
        finish: FinishReason | None = None
        async for chunk in chunks:
            for _, data in decoder.feed(chunk):
                frame = _json_or_none(data)
                if not isinstance(frame, dict):
                    raise ProviderProtocolError(f"{VENDOR} sent a malformed frame")
                if "error" in frame:
                    raise ProviderError(f"{VENDOR} reported an error mid-stream")
                for candidate in frame.get("candidates") or ():
                    for part in (candidate.get("content") or {}).get("parts") or ():
                        text = part.get("text")
                        if text:
                            yield text
                    if candidate.get("finishReason"):
                        finish = FINISH_REASONS.get(candidate["finishReason"], "stop")
                usage = frame.get("usageMetadata") or usage
        if finish is None:
            raise ProviderConnectionError(f"The {VENDOR} stream ended before it was complete")
        if usage is not None:
            yield Usage(usage.get("promptTokenCount") or 0, usage.get("candidatesTokenCount") or 0)
        yield Finish(finish)


def _json_or_none(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
