"""Gemini's ``streamGenerateContent`` (``alt=sse``): a direct HTTP call built from google-genai's types.

google-genai parses the stream itself into one pydantic object per frame and offers no raw byte stream; its
line parser also rejects SSE comment lines. So the request body is assembled from the SDK's own request
types (``types.Content``, ``types.GenerationConfig``, dumped by their wire aliases), sent over our
pool like every other vendor's, and read through our SSE decoder and orjson.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson
from google.genai import types

from providers.base import (
    GEMINI_MODELS,
    Attachment,
    ChatMessage,
    Finish,
    FinishReason,
    ProviderConnectionError,
    ProviderError,
    ProviderProtocolError,
    ProviderRequest,
    ProviderStatusError,
    ProviderStream,
    StreamBatch,
    UpstreamConfig,
    Usage,
    failed,
)
from providers.http import Upstream
from providers.sse import json_frame

VENDOR = "Gemini"
DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
FINISH_REASONS: dict[str, FinishReason] = {
    "STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "content_filter", "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter", "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
}


def _wire(model: Any) -> Any:
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


def attachment_part(attachment: Attachment) -> types.Part:
    """``inlineData`` for a data URL, ``fileData`` (which Gemini fetches) for a link."""
    data = attachment.data
    if data is None:
        return types.Part(file_data=types.FileData(file_uri=attachment.url, mime_type=attachment.media_type))
    return types.Part(inline_data=types.Blob(data=base64.b64decode(data), mime_type=attachment.media_type))


def parts_of(message: ChatMessage) -> list[types.Part]:
    """A message's parts: a part for each attachment (Gemini's advice: files first), then its text."""
    return [*map(attachment_part, message.attachments), types.Part(text=message.content)]


def generate_body(request: ProviderRequest) -> dict[str, Any]:
    contents = [
        types.Content(role="model" if m.role == "assistant" else "user", parts=parts_of(m))
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
        self.has_credentials = bool(api_key)
        self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self.headers = {"x-goog-api-key": api_key or "", "content-type": "application/json"}
        self.upstream = Upstream(VENDOR, config)

    async def aclose(self) -> None:
        await self.upstream.aclose()

    def accepts(self, attachment: Attachment) -> bool:
        return True  # images and PDFs, by link or data

    def stream(self, request: ProviderRequest) -> ProviderStream:
        if not self.has_credentials:
            return failed(ProviderStatusError(401, "No API key is configured for gemini (GEMINI_API_KEY)"))
        url = f"{self.base_url}/v1beta/models/{request.model}:streamGenerateContent?alt=sse"
        body = orjson.dumps(generate_body(request))
        return self.upstream.stream(url, body, self.headers, ResponseReader())


class ResponseReader:
    """``GenerateContentResponse`` frames: candidates' text parts and finish reason, ``usageMetadata``
    (running totals); the stream is complete when its bytes end after a finish reason."""

    def __init__(self) -> None:
        self.usage: dict[str, Any] | None = None
        self.finish: FinishReason | None = None

    def event(self, name: bytes | None, data: bytes, batch: StreamBatch) -> bool:
        frame = json_frame(data, VENDOR)
        if not isinstance(frame, dict):
            raise ProviderProtocolError(f"{VENDOR} sent a malformed frame")
        if "error" in frame:
            raise ProviderError(f"{VENDOR} reported an error mid-stream")
        for candidate in frame.get("candidates") or ():
            for part in (candidate.get("content") or {}).get("parts") or ():
                text = part.get("text")
                if text:
                    batch.append(text)
            if candidate.get("finishReason"):
                self.finish = FINISH_REASONS.get(candidate["finishReason"], "stop")
        self.usage = frame.get("usageMetadata") or self.usage
        return False

    def end(self, batch: StreamBatch) -> None:
        if self.finish is None:
            raise ProviderConnectionError(f"The {VENDOR} stream ended before it was complete")
        if self.usage is not None:
            batch.append(Usage(self.usage.get("promptTokenCount") or 0, self.usage.get("candidatesTokenCount") or 0))
        batch.append(Finish(self.finish))
