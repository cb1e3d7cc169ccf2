"""Gemini's ``streamGenerateContent`` (``alt=sse``): a direct HTTP call built from google-genai's types.

google-genai parses the stream itself into one pydantic object per frame and offers no raw byte stream; its
line parser also rejects SSE comment lines. So the request body is assembled from the SDK's own request
types (``types.Content``, ``types.GenerationConfig``, dumped by their wire aliases), sent over our
pool like every other vendor's, and read through our SSE decoder and orjson.

Reasoning: an effort asks for ``generationConfig.thinkingConfig`` ``{"thinkingBudget": N, "includeThoughts":
true}`` (N from ``REASONING_BUDGETS``). A part with ``"thought": true`` is reasoning, its text a
ReasoningDelta. A ``thoughtSignature`` must go back on the part it came on: on a thought part it rides on
that part's ReasoningDelta; on a text or ``functionCall`` part it comes as a ReasoningDelta with no text
right after the part's text or tool call, and goes back (``Reasoning`` with no text) on the turn's first
``functionCall`` part, or, in a turn without calls, on its last text part: where Gemini puts it.
``thoughtsTokenCount`` is the reasoning's usage, outside ``candidatesTokenCount``: output is their sum.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from typing import Any
from urllib.parse import quote

import orjson
from google.genai import types

from providers.base import (
    GEMINI_MODELS,
    REASONING_BUDGETS,
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
    Reasoning,
    ReasoningDelta,
    StreamBatch,
    ToolCallDelta,
    UpstreamConfig,
    Usage,
    check_model_id,
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


def signature_bytes(signature: str | None) -> bytes | None:
    """A ``thoughtSignature`` as the SDK's type holds it: the bytes of its base64 (standard or URL-safe);
    None for none, or for one that is not base64 (Gemini would refuse the call for it)."""
    if not signature:
        return None
    try:
        return base64.b64decode(signature, altchars=b"-_")
    except (binascii.Error, ValueError):
        return None


def thought_parts(reasoning: tuple[Reasoning, ...]) -> list[types.Part]:
    """An assistant turn's reasoning that has text, as ``thought`` parts with their signatures."""
    return [types.Part(text=piece.text, thought=True, thought_signature=signature_bytes(piece.signature))
            for piece in reasoning if piece.text]


def model_parts(message: ChatMessage) -> list[types.Part]:
    """An assistant turn: its thoughts, its text, then its tool calls as ``functionCall`` parts. A signature
    that came without thought text goes back where Gemini puts one: on the first call, or, with no calls,
    on the last text part."""
    signature = signature_bytes(next((r.signature for r in message.reasoning if not r.text and r.signature), None))
    calls = [types.Part(function_call=types.FunctionCall(
        id=c.id, name=c.name, args=orjson.loads(c.arguments or "{}"))) for c in message.tool_calls]
    if calls:
        answer = [types.Part(text=message.content)] if message.content else []
        calls[0].thought_signature = signature
    else:
        answer = parts_of(message)
        answer[-1].thought_signature = signature
    return thought_parts(message.reasoning) + answer + calls


def contents_of(messages: list[ChatMessage]) -> list[types.Content]:
    """The conversation: an assistant's thoughts, text and tool calls (``functionCall`` parts), and the
    results of consecutive tool messages as ``functionResponse`` parts of one user turn (named by the call
    they answer; a result that is not a JSON object is given as ``{"result": ...}``)."""
    names = {c.id: c.name for m in messages for c in m.tool_calls}
    contents: list[types.Content] = []
    for message in messages:
        if message.tool_call_id is not None:
            try:
                result = orjson.loads(message.content)
            except orjson.JSONDecodeError:
                result = message.content
            part = types.Part(function_response=types.FunctionResponse(
                id=message.tool_call_id, name=names.get(message.tool_call_id, message.tool_call_id),
                response=result if isinstance(result, dict) else {"result": result}))
            if contents and contents[-1].parts and contents[-1].parts[-1].function_response is not None:
                contents[-1].parts.append(part)
            else:
                contents.append(types.Content(role="user", parts=[part]))
        elif message.role == "assistant":
            contents.append(types.Content(role="model", parts=model_parts(message)))
        else:
            contents.append(types.Content(role="user", parts=parts_of(message)))
    return contents


def tools_of(request: ProviderRequest) -> dict[str, Any]:
    tool = types.Tool(function_declarations=[
        types.FunctionDeclaration(name=t.name, description=t.description, parameters_json_schema=t.parameters)
        for t in request.tools])
    body: dict[str, Any] = {"tools": [_wire(tool)]}
    if request.tool_choice:  # a forced tool comes with "required"
        mode = {"auto": "AUTO", "none": "NONE", "required": "ANY"}[request.tool_choice]
        config = types.FunctionCallingConfig(
            mode=mode, allowed_function_names=[request.forced_tool] if request.forced_tool else None)  # type: ignore[arg-type]
        body["toolConfig"] = _wire(types.ToolConfig(function_calling_config=config))
    return body


def generate_body(request: ProviderRequest) -> dict[str, Any]:
    contents = contents_of([m for m in request.messages if m.role != "system"])
    body: dict[str, Any] = {"contents": [_wire(c) for c in contents]}
    if request.tools:
        body |= tools_of(request)
    if request.system:
        body["systemInstruction"] = _wire(types.Content(parts=[types.Part(text=request.system)]))
    fmt = request.response_format
    effort = request.reasoning_effort
    config = types.GenerationConfig(
        max_output_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
        stop_sequences=list(request.stop) or None, response_mime_type="application/json" if fmt else None,
        response_json_schema=fmt.schema if fmt else None,
        thinking_config=types.ThinkingConfig(thinking_budget=REASONING_BUDGETS[effort], include_thoughts=True)
        if effort else None,
    )
    if generation := _wire(config):
        body["generationConfig"] = generation
    return body


class GeminiProvider:
    def __init__(self, api_key: str | None, base_url: str | None, config: UpstreamConfig) -> None:
        self.name = "gemini"
        self.models: tuple[str, ...] = GEMINI_MODELS
        self.response_formats = frozenset({"json_object", "json_schema"})
        self.has_credentials = bool(api_key)
        self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self.headers = {"x-goog-api-key": api_key or "", "content-type": "application/json"}
        self.upstream = Upstream(VENDOR, config)

    async def aclose(self) -> None:
        await self.upstream.aclose()

    def check_model(self, model: str) -> None:
        check_model_id(model)

    def accepts(self, attachment: Attachment) -> bool:
        return True  # images and PDFs, by link or data

    def stream(self, request: ProviderRequest) -> ProviderStream:
        if not self.has_credentials:
            return failed(ProviderStatusError(401, "No API key is configured for gemini (GEMINI_API_KEY)"))
        # The id is one path segment, escaped whole: "x:countTokens?key=..#" or "../" cannot steer the call.
        url = f"{self.base_url}/v1beta/models/{quote(request.model, safe='')}:streamGenerateContent?alt=sse"
        body = orjson.dumps(generate_body(request))
        return self.upstream.stream(url, body, self.headers, ResponseReader())


class ResponseReader:
    """``GenerateContentResponse`` frames: candidates' thought, text and function-call parts and finish
    reason, ``usageMetadata`` (running totals); the stream is complete when its bytes end after a finish
    reason."""

    def __init__(self) -> None:
        self.usage: dict[str, Any] | None = None
        self.finish: FinishReason | None = None
        self.calls = 0  # function calls so far: each comes whole, in one part

    def event(self, name: bytes | None, data: bytes, batch: StreamBatch) -> bool:
        frame = json_frame(data, VENDOR)
        if not isinstance(frame, dict):
            raise ProviderProtocolError(f"{VENDOR} sent a malformed frame")
        if "error" in frame:
            raise ProviderError(f"{VENDOR} reported an error mid-stream")
        for candidate in frame.get("candidates") or ():
            for part in (candidate.get("content") or {}).get("parts") or ():
                text = part.get("text")
                if part.get("thought"):
                    if text or "thoughtSignature" in part:
                        batch.append(ReasoningDelta(text or "", part.get("thoughtSignature") or None))
                    continue
                if text:
                    batch.append(text)
                elif "functionCall" in part:
                    call = part["functionCall"]
                    batch.append(ToolCallDelta(self.calls, call.get("id") or f"call_{uuid.uuid4().hex[:24]}",
                                               call.get("name"), orjson.dumps(call.get("args") or {}).decode()))
                    self.calls += 1
                if "thoughtSignature" in part:  # on an answer part: it goes back there (see the module)
                    batch.append(ReasoningDelta("", part["thoughtSignature"]))
            if candidate.get("finishReason"):
                self.finish = FINISH_REASONS.get(candidate["finishReason"], "stop")
                if self.calls and self.finish == "stop":  # Gemini ends a turn of calls with STOP
                    self.finish = "tool_calls"
        self.usage = frame.get("usageMetadata") or self.usage
        return False

    def end(self, batch: StreamBatch) -> None:
        if self.finish is None:
            raise ProviderConnectionError(f"The {VENDOR} stream ended before it was complete")
        if self.usage is not None:
            thoughts = self.usage.get("thoughtsTokenCount")
            batch.append(Usage(self.usage.get("promptTokenCount") or 0,
                               (self.usage.get("candidatesTokenCount") or 0) + (thoughts or 0), thoughts))
        batch.append(Finish(self.finish))
