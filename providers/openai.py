"""OpenAI Chat Completions streaming, and any OpenAI-compatible server (vLLM, Ollama, LM Studio, ...).

The official SDK client holds the configuration (base URL, ``OPENAI_BASE_URL``, key, the headers it sends);
the request goes over our connection pool (providers/http.py) and the stream is read through our SSE decoder
and orjson. Measured on one core (docs/performance.md): the SDK's typed ``create()`` spends 3.4 ms per call
building the request (12 ms with 21 messages) and parses a pydantic object per chunk; a 64-delta stream through
its raw ``client.post`` costs 1.8-4.8 ms on its transports, 0.9 ms on aiohttp alone.

Reasoning: the effort goes as ``reasoning_effort``; the reasoning streams from compatible servers as
``delta.reasoning_content`` (DeepSeek, older vLLM) or ``delta.reasoning`` (vLLM 0.19.1+, Ollama, OpenRouter)
and its token count as ``usage.completion_tokens_details.reasoning_tokens``. Reasoning is not sent back in
history: a Chat Completions message has no field for it.
"""

from __future__ import annotations

from typing import Any

import openai
import orjson

from providers.base import (
    IMAGE_TYPES,
    OPENAI_MODELS,
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
    ReasoningDelta,
    StreamBatch,
    ToolCallDelta,
    UpstreamConfig,
    Usage,
    check_model_id,
    failed,
    omitted,
)
from providers.http import Upstream, sdk_headers

FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop", "length": "length", "content_filter": "content_filter", "tool_calls": "tool_calls",
    "function_call": "tool_calls",
}


def content_parts(message: ChatMessage) -> list[dict[str, Any]]:
    """A message with attachments: its text, then an ``image_url`` or ``file`` part for each."""
    text = message.content
    parts: list[dict[str, Any]] = []
    for attachment in message.attachments:
        if attachment.media_type in IMAGE_TYPES:
            parts.append({"type": "image_url", "image_url": {"url": attachment.url}})
        elif attachment.data is not None:
            parts.append({"type": "file", "file": {"filename": attachment.name, "file_data": attachment.url}})
        else:
            text += "\n" + omitted(attachment)
    return [{"type": "text", "text": text}, *parts]


def message_of(message: ChatMessage) -> dict[str, Any]:
    if message.tool_call_id is not None:
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
    if message.tool_calls:
        return {"role": "assistant", "content": message.content or None, "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in message.tool_calls]}
    return {"role": message.role, "content": content_parts(message) if message.attachments else message.content}


def tools_of(request: ProviderRequest) -> dict[str, Any]:
    """The request's ``tools`` and ``tool_choice``."""
    body: dict[str, Any] = {"tools": [
        {"type": "function", "function": {"name": t.name, "parameters": t.parameters}
         | ({"description": t.description} if t.description else {})} for t in request.tools]}
    if request.forced_tool:
        body["tool_choice"] = {"type": "function", "function": {"name": request.forced_tool}}
    elif request.tool_choice:
        body["tool_choice"] = request.tool_choice
    return body


def chat_body(request: ProviderRequest) -> dict[str, Any]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": request.system}] if request.system else []
    messages += map(message_of, request.messages)
    body: dict[str, Any] = {
        "model": request.model, "messages": messages, "stream": True, "stream_options": {"include_usage": True},
    }
    if request.tools:
        body |= tools_of(request)
    if request.reasoning_effort is not None:
        body["reasoning_effort"] = request.reasoning_effort
    if (fmt := request.response_format) is not None:
        body["response_format"] = {"type": "json_object"} if fmt.kind == "json_object" else {
            "type": "json_schema", "json_schema": {"name": fmt.name, "schema": fmt.schema}
            | ({"strict": fmt.strict} if fmt.strict is not None else {})}
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.stop:
        body["stop"] = list(request.stop)
    return body


class OpenAIProvider:
    """One OpenAI-kind endpoint: OpenAI itself or a named OpenAI-compatible server."""

    def __init__(
        self, name: str, api_key: str | None, base_url: str | None, config: UpstreamConfig,
        vendor: str = "OpenAI", models: tuple[str, ...] = OPENAI_MODELS,
    ) -> None:
        self.name = name
        self.models = models
        self.response_formats = frozenset({"json_object", "json_schema"})
        self.vendor = vendor
        self.has_credentials = bool(api_key)
        client = openai.AsyncOpenAI(api_key=api_key or "no-key-configured", base_url=base_url)
        self.url = f"{str(client.base_url).rstrip('/')}/chat/completions"
        self.headers = sdk_headers(client)
        self.upstream = Upstream(vendor, config)

    async def aclose(self) -> None:
        await self.upstream.aclose()

    def check_model(self, model: str) -> None:
        check_model_id(model)

    def accepts(self, attachment: Attachment) -> bool:
        """Images by link or data URL; a PDF only as data (Chat Completions takes no file links)."""
        return attachment.media_type in IMAGE_TYPES or attachment.data is not None

    def stream(self, request: ProviderRequest) -> ProviderStream:
        if not self.has_credentials and self.name == "openai":
            return failed(ProviderStatusError(401, "No API key is configured for openai (OPENAI_API_KEY)"))
        body = orjson.dumps(chat_body(request))
        return self.upstream.stream(self.url, body, self.headers, ChunkReader(self.vendor))


class ChunkReader:
    """``chat.completion.chunk`` frames: reasoning, text and tool-call deltas, the finish reason, usage in
    the last frame, ``[DONE]``."""

    __slots__ = ("finish", "vendor")

    def __init__(self, vendor: str) -> None:
        self.vendor = vendor
        self.finish: FinishReason = "stop"

    def event(self, name: bytes | None, data: bytes, batch: StreamBatch) -> bool:
        if data == b"[DONE]":
            batch.append(Finish(self.finish))
            return True
        try:
            frame = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise ProviderProtocolError(f"{self.vendor} sent a malformed frame") from None
        choices = frame.get("choices")
        if choices:
            choice = choices[0]
            delta = choice.get("delta") or {}
            thought = delta.get("reasoning_content") or delta.get("reasoning")
            if thought and isinstance(thought, str):
                batch.append(ReasoningDelta(thought))
            text = delta.get("content")
            if text:
                batch.append(text)
            if "tool_calls" in delta:
                for call in delta["tool_calls"] or ():
                    function = call.get("function") or {}
                    batch.append(ToolCallDelta(call.get("index", 0), call.get("id"), function.get("name"),
                                               function.get("arguments") or ""))
            if choice.get("finish_reason"):
                self.finish = FINISH_REASONS.get(choice["finish_reason"], "stop")
        elif "error" in frame:
            raise ProviderError(f"{self.vendor} reported an error mid-stream")
        usage = frame.get("usage")
        if usage:
            details = usage.get("completion_tokens_details") or {}
            batch.append(Usage(usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0,
                               details.get("reasoning_tokens")))
        return False

    def end(self, batch: StreamBatch) -> None:
        raise ProviderConnectionError(f"The {self.vendor} stream ended before it was complete")
