"""Anthropic Messages streaming: the official SDK client holds the configuration (base URL, key, its
``anthropic-version`` and other headers); the request goes over our connection pool, as for OpenAI, and the
stream is read through our SSE decoder.

Events: ``message_start`` (input usage), ``content_block_start`` (a ``tool_use``, ``thinking`` or
``redacted_thinking`` block), ``content_block_delta`` (text, tool input, thinking and its signature),
``message_delta`` (stop reason and the output usage, which is cumulative), ``message_stop``, ``ping`` and
``error``.

Reasoning: an effort enables extended thinking, ``{"type": "enabled", "budget_tokens": N}`` (N from
``REASONING_BUDGETS``), unless the request requires a tool call, which Anthropic refuses with thinking. The
budget must be below ``max_tokens``, which counts the thinking too: when it is not, ``max_tokens`` becomes
the budget plus the answer's own limit. With thinking, Anthropic takes no temperature but 1 (it is left
out) and a ``top_p`` of 0.95 or more only. Thinking blocks go back in history, signed, before the turn's
text and ``tool_use`` blocks: a tool-using turn with thinking fails without them. Anthropic reports no
separate count of thinking tokens (they are in ``output_tokens``).
"""

from __future__ import annotations

from typing import Any

import anthropic
import orjson

from providers.base import (
    ANTHROPIC_MODELS,
    IMAGE_TYPES,
    REASONING_BUDGETS,
    Attachment,
    ChatMessage,
    Finish,
    FinishReason,
    ProviderConnectionError,
    ProviderError,
    ProviderRequest,
    ProviderStatusError,
    ProviderStream,
    Reasoning,
    ReasoningDelta,
    StreamBatch,
    ToolCallDelta,
    UpstreamConfig,
    Usage,
    check_model_id,
    failed,
)
from providers.http import Upstream, sdk_headers
from providers.sse import json_frame

VENDOR = "Anthropic"
DEFAULT_MAX_TOKENS = 4096  # the Messages API requires max_tokens
FINISH_REASONS: dict[str, FinishReason] = {
    "end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
    "refusal": "content_filter", "pause_turn": "stop",
}
# Mid-stream error types, as the HTTP status the same error has before a stream starts.
ERROR_STATUS = {"overloaded_error": 529, "rate_limit_error": 429, "api_error": 500, "timeout_error": 504}


def attachment_block(attachment: Attachment) -> dict[str, Any]:
    """An ``image`` block, or a ``document`` block for a PDF; by link (``url`` source) or data (``base64``)."""
    data = attachment.data
    source = ({"type": "url", "url": attachment.url} if data is None
              else {"type": "base64", "media_type": attachment.media_type, "data": data})
    if attachment.media_type in IMAGE_TYPES:
        return {"type": "image", "source": source}
    return {"type": "document", "source": source, "title": attachment.name}


def content_blocks(message: ChatMessage) -> list[dict[str, Any]]:
    """A message with attachments: a block for each, then its text (Anthropic's advice: files first)."""
    return [*map(attachment_block, message.attachments), {"type": "text", "text": message.content}]


def thinking_blocks(reasoning: tuple[Reasoning, ...]) -> list[dict[str, Any]]:
    """An assistant turn's reasoning as ``thinking`` and ``redacted_thinking`` blocks, in order. A piece with
    no signature is left out: Anthropic refuses a thinking block it cannot verify."""
    blocks: list[dict[str, Any]] = []
    for piece in reasoning:
        if piece.redacted is not None:
            blocks.append({"type": "redacted_thinking", "data": piece.redacted})
        elif piece.signature is not None:
            blocks.append({"type": "thinking", "thinking": piece.text, "signature": piece.signature})
    return blocks


def message_of(message: ChatMessage) -> dict[str, Any]:
    """A user or assistant message; an assistant's thinking blocks come first, then its text, then its tool
    calls as ``tool_use`` blocks."""
    thinking = thinking_blocks(message.reasoning) if message.reasoning else []
    if message.tool_calls or thinking:
        blocks = thinking + (content_blocks(message) if message.attachments
                             else [{"type": "text", "text": message.content}] if message.content else [])
        blocks += [{"type": "tool_use", "id": c.id, "name": c.name, "input": orjson.loads(c.arguments or "{}")}
                   for c in message.tool_calls]
        return {"role": "assistant", "content": blocks}
    return {"role": message.role, "content": content_blocks(message) if message.attachments else message.content}


def messages_of(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The conversation; the results of consecutive tool messages are ``tool_result`` blocks of one user
    message."""
    out: list[dict[str, Any]] = []
    results: list[dict[str, Any]] | None = None  # the blocks of the tool results' user message, while open
    for message in messages:
        if message.tool_call_id is None:
            out.append(message_of(message))
            results = None
            continue
        if results is None:
            results = []
            out.append({"role": "user", "content": results})
        results.append({"type": "tool_result", "tool_use_id": message.tool_call_id, "content": message.content})
    return out


def tools_of(request: ProviderRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"tools": [
        {"name": t.name, "input_schema": t.parameters} | ({"description": t.description} if t.description else {})
        for t in request.tools]}
    if request.forced_tool:
        body["tool_choice"] = {"type": "tool", "name": request.forced_tool}
    elif request.tool_choice:
        body["tool_choice"] = {"type": {"required": "any"}.get(request.tool_choice, request.tool_choice)}
    return body


def thinking_budget(request: ProviderRequest) -> int | None:
    """The thinking budget the request's effort asks for; None for no thinking, which is also the case when
    a tool call is required (Anthropic takes thinking only with ``tool_choice`` auto or none)."""
    if request.reasoning_effort is None or request.tool_choice == "required" or request.forced_tool:
        return None
    return REASONING_BUDGETS[request.reasoning_effort]


def messages_body(request: ProviderRequest) -> dict[str, Any]:
    budget = thinking_budget(request)
    max_tokens = request.max_tokens or DEFAULT_MAX_TOKENS
    if budget is not None and budget >= max_tokens:  # the budget must be below max_tokens, which counts it
        max_tokens += budget
    body: dict[str, Any] = {
        "model": request.model, "max_tokens": max_tokens, "stream": True,
        "messages": messages_of([m for m in request.messages if m.role != "system"]),
    }
    if budget is not None:
        body["thinking"] = {"type": "enabled", "budget_tokens": budget}
    if request.tools:
        body |= tools_of(request)
    if request.response_format is not None:  # only json_schema: Messages has no schemaless JSON mode
        body["output_config"] = {"format": {"type": "json_schema", "schema": request.response_format.schema}}
    if request.system:
        body["system"] = request.system
    if request.temperature is not None and budget is None:
        body["temperature"] = min(request.temperature, 1.0)  # Anthropic's range is 0..1
    if request.top_p is not None and (budget is None or request.top_p >= 0.95):
        body["top_p"] = request.top_p
    if request.stop:
        body["stop_sequences"] = list(request.stop)
    return body


class AnthropicProvider:
    def __init__(self, api_key: str | None, base_url: str | None, config: UpstreamConfig) -> None:
        self.name = "anthropic"
        self.models: tuple[str, ...] = ANTHROPIC_MODELS
        self.response_formats = frozenset({"json_schema"})
        self.has_credentials = bool(api_key)
        client = anthropic.AsyncAnthropic(api_key=api_key or "no-key-configured", base_url=base_url)
        self.url = f"{str(client.base_url).rstrip('/')}/v1/messages"
        self.headers = sdk_headers(client)
        self.upstream = Upstream(VENDOR, config)

    async def aclose(self) -> None:
        await self.upstream.aclose()

    def check_model(self, model: str) -> None:
        check_model_id(model)

    def accepts(self, attachment: Attachment) -> bool:
        return True  # images and PDFs, by link or data

    def stream(self, request: ProviderRequest) -> ProviderStream:
        if not self.has_credentials:
            return failed(ProviderStatusError(401, "No API key is configured for anthropic (ANTHROPIC_API_KEY)"))
        body = orjson.dumps(messages_body(request))
        return self.upstream.stream(self.url, body, self.headers, MessageReader())


class MessageReader:
    """Named events: ``message_start`` (input usage), ``content_block_start`` (tool calls, thinking blocks),
    ``content_block_delta`` (text, tool input, thinking, signatures), ``message_delta`` (stop reason and the
    cumulative output usage), ``message_stop``; ``ping`` is skipped and ``error`` raised."""

    def __init__(self) -> None:
        self.input_tokens = self.output_tokens = 0
        self.finish: FinishReason = "stop"
        self.calls: dict[int, int] = {}  # a tool_use block's index -> its call's index

    def event(self, name: bytes | None, data: bytes, batch: StreamBatch) -> bool:
        if name == b"content_block_delta":
            frame = json_frame(data, VENDOR)
            delta = frame["delta"]
            text = delta.get("text")
            if text:
                batch.append(text)
            else:
                self._delta(frame, delta, batch)
        elif name == b"content_block_start":
            self._block(json_frame(data, VENDOR), batch)
        elif name == b"message_start":
            usage = json_frame(data, VENDOR)["message"].get("usage") or {}
            self.input_tokens = usage.get("input_tokens") or 0
            self.output_tokens = usage.get("output_tokens") or 0
        elif name == b"message_delta":
            frame = json_frame(data, VENDOR)
            reason = (frame.get("delta") or {}).get("stop_reason")
            if reason:
                self.finish = FINISH_REASONS.get(reason, "stop")
            self.output_tokens = (frame.get("usage") or {}).get("output_tokens", self.output_tokens)
        elif name == b"message_stop":
            batch += [Usage(self.input_tokens, self.output_tokens), Finish(self.finish)]
            return True
        elif name == b"error":
            raise _stream_error(json_frame(data, VENDOR))
        return False

    def _delta(self, frame: dict[str, Any], delta: dict[str, Any], batch: StreamBatch) -> None:
        """A delta that is not text: a piece of a tool call's input, of thinking, or a thinking block's
        signature (sent just before the block stops)."""
        kind = delta.get("type")
        if kind == "input_json_delta" and frame.get("index") in self.calls:
            batch.append(ToolCallDelta(self.calls[frame["index"]], None, None, delta.get("partial_json") or ""))
        elif kind == "thinking_delta" and delta.get("thinking"):
            batch.append(ReasoningDelta(delta["thinking"]))
        elif kind == "signature_delta" and delta.get("signature"):
            batch.append(ReasoningDelta("", signature=delta["signature"]))

    def _block(self, frame: dict[str, Any], batch: StreamBatch) -> None:
        """The start of a block: a tool call's id and name, or redacted thinking, which comes whole."""
        block = frame.get("content_block") or {}
        kind = block.get("type")
        if kind == "tool_use":
            call = self.calls[frame.get("index", 0)] = len(self.calls)
            batch.append(ToolCallDelta(call, block.get("id"), block.get("name"), ""))
        elif kind == "redacted_thinking":
            batch.append(ReasoningDelta("", redacted=block.get("data") or ""))
        elif kind == "thinking" and block.get("thinking"):
            batch.append(ReasoningDelta(block["thinking"], block.get("signature") or None))

    def end(self, batch: StreamBatch) -> None:
        raise ProviderConnectionError(f"The {VENDOR} stream ended before it was complete")


def _stream_error(frame: Any) -> ProviderError:
    kind = (frame.get("error") or {}).get("type", "error") if isinstance(frame, dict) else "error"
    status = ERROR_STATUS.get(kind)
    if status is None:
        return ProviderError(f"{VENDOR} reported an error mid-stream ({kind})")
    return ProviderStatusError(status, f"{VENDOR} reported {kind} mid-stream")
