"""The AI SDK's UI message stream protocol (v1), so ``useChat`` with ``DefaultChatTransport`` works as is.

``POST /v1/ui/chat`` takes the body the transport posts (``{id, messages, trigger, messageId}``) and stores
the turn in the caller's chat named by the client's ``id`` (created on first use; the client's id becomes a
UUID derived from the caller and that id). The last user message's ``file`` parts are its attachments (a
file uploaded to /v1/files by its download path, ``/v1/files/{id}/content``), and on a submit its id is
the client's message id (a retried submit is refused, not stored twice).
The answer is ``data: {json}`` chunks: ``start``; then, in stream order, text parts (``text-start``,
``text-delta``..., ``text-end``), reasoning parts (``reasoning-start``, ``-delta``..., ``-end``) and tool
calls (``tool-input-start``, ``tool-input-delta``..., then ``tool-input-available``, or
``tool-input-error`` for arguments that are not JSON); ``data-title`` (``{title}``, when a model wrote the
chat's title in time: gateway/streaming/titles.py), ``finish`` (usage in ``messageMetadata``), or
``error``; then ``data: [DONE]``. A turn with tools is one step (``start-step`` ... ``finish-step``).

Tools run on the client, as ``useChat`` runs them: the body may carry ``tools``, ``tool_choice`` and
``reasoning_effort`` as a send does; after ``addToolOutput`` the SDK posts the conversation again, its last
message the assistant's with the outputs in its tool parts (state ``output-available`` or
``output-error``). Those of its last step become the turn's ``tool_results`` (checked as a send's are),
announced back as ``tool-output-available`` (or ``tool-output-error``) before the next step streams. The SDK's ``stop()`` only
disconnects, which stores the partial reply as ``client_disconnected`` (unless the body says
``on_disconnect: "continue"``). ``GET /v1/ui/chat/{id}/stream`` is the SDK's resume: the current turn's
chunks from its start, then live to its end (gateway/api/resume.py); 204 when no turn is kept.
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.api.chats import new_chat, owner_of
from gateway.api.resume import resume
from gateway.api.schemas import (
    ModelName,
    ToolResult,
    TurnOptions,
    parse_body,
    validation_details,
)
from gateway.api.send import checked_content, run_turn, taken_back_if_refused
from gateway.edge.errors import ValidationFailed
from gateway.services import services_of
from gateway.streaming.turns import Turn, call_input
from providers.base import ProviderError, ReasoningDelta, ToolCall, ToolCallDelta, Usage
from storage import chats
from storage.chats import ChatFields, Owner
from storage.tapes import UI

HEADERS = {"x-vercel-ai-ui-message-stream": "v1"}
# The namespace of chat ids derived from a caller and a client's chat id.
CHAT_NAMESPACE = uuid.UUID("6c1b3c1e-3f0a-4d1e-9a57-5e8f2f0c7a11")
UPLOADED_FILE = re.compile(r"/v1/files/([0-9A-Fa-f-]{36})/content")
FINISH = {"stop": "stop", "length": "length", "content_filter": "content-filter", "tool_calls": "tool-calls",
          "error": "error"}


class UIPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class UIMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str = ""
    role: Literal["system", "user", "assistant"]
    parts: list[UIPart] = Field(default_factory=list, max_length=1000)


class UIChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    messages: list[UIMessage] = Field(min_length=1, max_length=1000)
    trigger: Literal["submit-message", "regenerate-message"] = "submit-message"
    messageId: str | None = None  # on a regenerate, the reply it replaces (nothing to keep of it)
    model: ModelName | None = None
    tools: list[Any] | None = None  # checked as a send's (TurnOptions)
    tool_choice: Any = None
    reasoning_effort: Any = None
    on_disconnect: Any = None


def chat_id_for(owner: Owner, client_id: str) -> uuid.UUID:
    return uuid.uuid5(CHAT_NAMESPACE, f"{owner.org_id}\x00{owner.user_id}\x00{client_id}")


def tool_outputs(message: UIMessage) -> list[dict[str, Any]]:
    """The outputs in the tool parts of ``message``'s last step, as ``tool_results`` entries."""
    step = next((n for n in range(len(message.parts) - 1, -1, -1) if message.parts[n].type == "step-start"), -1)
    results = []
    for part in message.parts[step + 1:]:
        extra = part.model_extra or {}
        if (part.type.startswith("tool-") or part.type == "dynamic-tool") and "toolCallId" in extra:
            if extra.get("state") == "output-available":
                results.append({"tool_call_id": extra["toolCallId"], "output": extra.get("output")})
            elif extra.get("state") == "output-error":
                results.append({"tool_call_id": extra["toolCallId"], "output": extra.get("errorText"), "is_error": True})
    return results


def last_user_message(body: UIChatRequest) -> UIMessage:
    for message in reversed(body.messages):
        if message.role == "user":
            return message
    raise ValidationFailed(details=[{"loc": ["messages"], "msg": "no user message", "type": "missing"}])


def attachment_of(part: dict[str, Any]) -> dict[str, Any]:
    """A ``file`` part as an attachment: a file uploaded to /v1/files when its URL is that file's download
    path (``/v1/files/{id}/content``), else a link or data URL."""
    url = part.get("url")
    if isinstance(url, str) and (uploaded := UPLOADED_FILE.fullmatch(url)):
        return {"file_id": uploaded.group(1)}
    return {"name": part.get("filename") or "file", "media_type": part.get("mediaType"), "url": url}


def turn_options(body: UIChatRequest, message: UIMessage) -> TurnOptions:
    """The turn's model, the message's ``file`` parts as its attachments, and, for a new message (not a
    regenerated reply), its id as the client's message id: a retried submit is not stored twice."""
    files = [attachment_of(part.model_extra or {}) for part in message.parts if part.type == "file"]
    client_id = message.id if body.trigger == "submit-message" and message.id and message.role == "user" else None
    fields = {"model": body.model, "client_message_id": client_id, "attachments": files, "tools": body.tools,
              "tool_choice": body.tool_choice, "reasoning_effort": body.reasoning_effort,
              "on_disconnect": body.on_disconnect}
    try:
        return TurnOptions.model_validate(fields)
    except ValidationError as error:
        raise ValidationFailed(details=validation_details(error)) from None


class UIMessageChunks:
    """The reply as UI message chunks: its text and reasoning parts opened and closed as they alternate,
    its tool calls as tool input chunks; usage in the finish chunk's metadata."""

    def __init__(self, results: list[ToolResult] | None = None) -> None:
        self.results = results or []  # the outputs this request posted back, announced at the start
        self.kind: str | None = None  # the open part: "text", "reasoning" or None
        self.closing = b""  # the chunk that ends it
        self.parts = 0
        self.stepped = False
        self.delta_prefix = self.reasoning_prefix = b""

    def start(self, turn: Turn) -> bytes:
        assert turn.ids is not None
        start = {"type": "start", "messageId": str(turn.ids.assistant_message_id),
                 "messageMetadata": {"chatId": str(turn.ids.chat_id), "model": turn.model}}
        chunks = _chunk(start) + b"".join(map(output_chunk, self.results))
        # A turn with tools is a step of the SDK's tool loop: it sends again only while the last step's
        # calls all have outputs.
        self.stepped = bool(turn.request.tools or self.results)
        return chunks + (b'data: {"type":"start-step"}\n\n' if self.stepped else b"")

    def _switch(self, kind: str | None) -> bytes:
        """End the open text or reasoning part and open one of ``kind`` (None: none)."""
        chunks, self.closing, self.kind = self.closing, b"", kind
        if kind is None:
            return chunks
        self.parts += 1
        part_id = f"{kind}-{self.parts}"
        self.closing = _chunk({"type": f"{kind}-end", "id": part_id})
        prefix = b'data: {"type":"%s-delta","id":"%s","delta":' % (kind.encode(), part_id.encode())
        if kind == "text":
            self.delta_prefix = prefix
        else:
            self.reasoning_prefix = prefix
        return chunks + _chunk({"type": f"{kind}-start", "id": part_id})

    def delta(self, text: str) -> bytes:
        head = b"" if self.kind == "text" else self._switch("text")
        return head + self.delta_prefix + orjson.dumps(text) + b"}\n\n"

    def usage(self, usage: Usage) -> None:
        return None

    def reasoning(self, delta: ReasoningDelta) -> bytes | None:
        if not delta.text:
            return None
        head = b"" if self.kind == "reasoning" else self._switch("reasoning")
        return head + self.reasoning_prefix + orjson.dumps(delta.text) + b"}\n\n"

    def tool_call(self, delta: ToolCallDelta, call_id: str) -> bytes:
        chunks = self._switch(None)
        if delta.id is not None or delta.name is not None:
            chunks += _chunk({"type": "tool-input-start", "toolCallId": call_id, "toolName": delta.name or ""})
        if delta.arguments:
            chunks += _chunk({"type": "tool-input-delta", "toolCallId": call_id, "inputTextDelta": delta.arguments})
        return chunks

    def tool_done(self, call: ToolCall) -> bytes:
        value, problem = call_input(call.arguments)
        chunk: dict[str, Any] = {"type": "tool-input-available", "toolCallId": call.id, "toolName": call.name,
                                 "input": value}
        if problem is not None:
            chunk |= {"type": "tool-input-error", "errorText": problem}
        return _chunk(chunk)

    def done(self, turn: Turn) -> bytes:
        usage, estimated = turn.final_usage()
        metadata: dict[str, Any] = {
            "model": turn.model, "finishReason": turn.ending, "durationMs": turn.duration_ms,
            "usage": {"inputTokens": usage.input_tokens, "outputTokens": usage.output_tokens,
                      "totalTokens": usage.input_tokens + usage.output_tokens, "estimated": estimated},
        }
        finish = {"type": "finish", "finishReason": FINISH.get(turn.ending or "", "other"), "messageMetadata": metadata}
        title = b"" if turn.title is None else _chunk({"type": "data-title", "data": {"title": turn.title}})
        step = b'data: {"type":"finish-step"}\n\n' if self.stepped else b""
        return self._switch(None) + step + title + _chunk(finish) + b"data: [DONE]\n\n"

    def error(self, turn: Turn, error: ProviderError) -> bytes:
        return self._switch(None) + _chunk({"type": "error", "errorText": error.message}) + b"data: [DONE]\n\n"


def _chunk(value: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(value) + b"\n\n"


def output_chunk(result: ToolResult) -> bytes:
    if result.is_error:
        text = result.output if isinstance(result.output, str) else orjson.dumps(result.output).decode()
        return _chunk({"type": "tool-output-error", "toolCallId": result.tool_call_id, "errorText": text})
    return _chunk({"type": "tool-output-available", "toolCallId": result.tool_call_id, "output": result.output})


async def ui_chat(request: Request) -> Response:
    body = await parse_body(request, UIChatRequest)
    services = services_of(request)
    owner = owner_of(request)
    last = body.messages[-1]
    results = tool_results_of(last) if last.role == "assistant" else None
    message = last if results is not None else last_user_message(body)
    content = ""
    if results is None:
        text = "".join(part.text or "" for part in message.parts if part.type == "text")
        content = checked_content(text, services.settings.max_message_chars, "messages")
    options = turn_options(body, message)
    chat_id = chat_id_for(owner, body.id)
    if await chats.get_chat(services.pool, owner, chat_id) is None:
        fields = ChatFields(None, body.model or services.settings.default_model, None, {"client_chat_id": body.id})
        chat = await new_chat(services, owner, fields, chat_id)
        async with taken_back_if_refused(services, owner, chat):
            return await run_turn(request, services, owner, chat_id, content, options, UIMessageChunks(results),
                                  HEADERS, results)
    return await run_turn(request, services, owner, chat_id, content, options, UIMessageChunks(results), HEADERS,
                          results)


def tool_results_of(message: UIMessage) -> list[ToolResult] | None:
    """The tool outputs the client posts back in its last (assistant) message; None when it holds none."""
    outputs = tool_outputs(message)
    if not outputs:
        return None
    try:
        return [ToolResult.model_validate(output) for output in outputs]
    except ValidationError as error:
        raise ValidationFailed(details=validation_details(error)) from None


async def resume_ui(request: Request) -> Response:
    """The AI SDK's resume (``useChat({resume: true})``): the current turn's chunks from its start, then live.
    A chat id no turn was posted to yet is a 204, as the SDK expects of a new chat (ids are the caller's own:
    no other caller's chat can be named)."""
    owner = owner_of(request)
    return await resume(services_of(request), owner, chat_id_for(owner, request.path_params["chat_id"]), None, 0,
                        UI, HEADERS, unknown_chat=204)


routes = [
    Route("/v1/ui/chat", ui_chat, methods=["POST"]),
    Route("/v1/ui/chat/{chat_id}/stream", resume_ui, methods=["GET"]),
]
