"""The AI SDK's UI message stream protocol (v1), so ``useChat`` with ``DefaultChatTransport`` works as is.

``POST /v1/ui/chat`` takes the body the transport posts (``{id, messages, trigger, messageId}``) and stores
the turn in the caller's chat named by the client's ``id`` (created on first use; the client's id becomes a
UUID derived from the caller and that id). The last user message's ``file`` parts are its attachments, and
on a submit its id is the client's message id (a retried submit is refused, not stored twice).
The answer is ``data: {json}`` chunks: ``start``, ``text-start``, ``text-delta``..., ``text-end``,
``finish`` (usage in ``messageMetadata``), or ``error``; then ``data: [DONE]``. The SDK's ``stop()`` only
disconnects, which stores the partial reply as ``client_disconnected``. Resumable streams do not exist yet,
so the resume request answers 204.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.api.chats import new_chat, owner_of
from gateway.api.schemas import ModelName, TurnOptions, parse_body, validation_details
from gateway.api.send import checked_content, run_turn
from gateway.edge.errors import ValidationFailed
from gateway.services import services_of
from gateway.streaming.turns import Turn
from providers.base import ProviderError, ToolCallDelta, Usage
from storage import chats
from storage.chats import ChatFields, Owner

HEADERS = {"x-vercel-ai-ui-message-stream": "v1"}
# The namespace of chat ids derived from a caller and a client's chat id.
CHAT_NAMESPACE = uuid.UUID("6c1b3c1e-3f0a-4d1e-9a57-5e8f2f0c7a11")
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


def chat_id_for(owner: Owner, client_id: str) -> uuid.UUID:
    return uuid.uuid5(CHAT_NAMESPACE, f"{owner.org_id}\x00{owner.user_id}\x00{client_id}")


def last_user_message(body: UIChatRequest) -> UIMessage:
    for message in reversed(body.messages):
        if message.role == "user":
            return message
    raise ValidationFailed(details=[{"loc": ["messages"], "msg": "no user message", "type": "missing"}])


def turn_options(body: UIChatRequest, message: UIMessage) -> TurnOptions:
    """The turn's model, the message's ``file`` parts as its attachments, and, for a new message (not a
    regenerated reply), its id as the client's message id: a retried submit is not stored twice."""
    files = [{"name": extra.get("filename") or "file", "media_type": extra.get("mediaType"), "url": extra.get("url")}
             for part in message.parts if part.type == "file" for extra in [part.model_extra or {}]]
    client_id = message.id if body.trigger == "submit-message" and message.id else None
    try:
        return TurnOptions.model_validate({"model": body.model, "client_message_id": client_id, "attachments": files})
    except ValidationError as error:
        raise ValidationFailed(details=validation_details(error)) from None


class UIMessageChunks:
    """The reply as UI message chunks: one text part, usage in the finish chunk's metadata."""

    def __init__(self) -> None:
        self.delta_prefix = b'data: {"type":"text-delta","id":"text-1","delta":'

    def start(self, turn: Turn) -> bytes:
        assert turn.ids is not None
        start = {"type": "start", "messageId": str(turn.ids.assistant_message_id),
                 "messageMetadata": {"chatId": str(turn.ids.chat_id), "model": turn.model}}
        return _chunk(start) + b'data: {"type":"text-start","id":"text-1"}\n\n'

    def delta(self, text: str) -> bytes:
        return self.delta_prefix + orjson.dumps(text) + b"}\n\n"

    def usage(self, usage: Usage) -> None:
        return None

    def tool_call(self, delta: ToolCallDelta) -> None:
        return None  # a chat turn offers the model no tools

    def done(self, turn: Turn) -> bytes:
        usage, estimated = turn.final_usage()
        metadata: dict[str, Any] = {
            "model": turn.model, "finishReason": turn.ending, "durationMs": turn.duration_ms,
            "usage": {"inputTokens": usage.input_tokens, "outputTokens": usage.output_tokens,
                      "totalTokens": usage.input_tokens + usage.output_tokens, "estimated": estimated},
        }
        finish = {"type": "finish", "finishReason": FINISH.get(turn.ending or "", "other"), "messageMetadata": metadata}
        return b'data: {"type":"text-end","id":"text-1"}\n\n' + _chunk(finish) + b"data: [DONE]\n\n"

    def error(self, turn: Turn, error: ProviderError) -> bytes:
        return (b'data: {"type":"text-end","id":"text-1"}\n\n' + _chunk({"type": "error", "errorText": error.message})
                + b"data: [DONE]\n\n")


def _chunk(value: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(value) + b"\n\n"


async def ui_chat(request: Request) -> Response:
    body = await parse_body(request, UIChatRequest)
    services = services_of(request)
    owner = owner_of(request)
    message = last_user_message(body)
    text = "".join(part.text or "" for part in message.parts if part.type == "text")
    content = checked_content(text, services.settings.max_message_chars, "messages")
    options = turn_options(body, message)
    chat_id = chat_id_for(owner, body.id)
    if await chats.get_chat(services.pool, owner, chat_id) is None:
        fields = ChatFields(None, body.model or services.settings.default_model, None, {"client_chat_id": body.id})
        await new_chat(services, owner, fields, chat_id)
    return await run_turn(request, services, owner, chat_id, content, options, UIMessageChunks(), HEADERS)


async def resume(request: Request) -> Response:
    owner_of(request)
    return Response(status_code=204)


routes = [
    Route("/v1/ui/chat", ui_chat, methods=["POST"]),
    Route("/v1/ui/chat/{chat_id}/stream", resume, methods=["GET"]),
]
