"""The API's OpenAPI 3.1 description at ``/openapi.json``, and ``/docs``, a page that reads it.

Request bodies and query strings are described from the pydantic models the endpoints validate with.
Answers are described by the models below; the tests hold real answers to them (extra fields forbidden),
so the description cannot drift from what the gateway sends. The document is built once per process.

Past 400 lines because most of it is data: the answer models and their descriptions, one per shape the
API sends.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from gateway.api.compat import CompletionRequest
from gateway.api.files import FILE_TYPES, FileList, UploadQuery
from gateway.api.page import STATIC
from gateway.api.schemas import (
    ChatCreate,
    ChatList,
    ChatPatch,
    ChatRead,
    ChatTurn,
    MessagePage,
    PermanentFlag,
    QuotaLimits,
    SendMessage,
    UsageReportQuery,
)
from gateway.api.ui_stream import UIChatRequest
from gateway.edge.errors import OPENAI_PATHS
from gateway.edge.responses import JSONBody


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MessageUsage(Answer):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    estimated: bool
    reasoning_tokens: int | None = Field(default=None, description="Of output_tokens, those spent reasoning, "
                                         "when the vendor says (charged as output)")


class Message(Answer):
    """A message. ``parts``, in stream order: a user's ``text`` and ``attachment``s; a reply with reasoning
    or tool calls, its ``{type: "reasoning", text, signature?, redacted?}``, ``{type: "text", text}`` and
    ``{type: "tool-call", tool_call_id, tool_name, input, input_error?}`` (a reply of text alone has none:
    ``content`` is its text); a ``tool`` message's ``{type: "tool-result", tool_call_id, output, is_error}``.
    """

    id: uuid.UUID
    chat_id: uuid.UUID
    role: Literal["user", "assistant", "system", "tool"]
    content: str
    parts: list[dict[str, Any]]
    status: Literal["streaming", "complete", "cancelled", "error", "interrupted"]
    finish_reason: str | None
    model: str | None
    usage: MessageUsage | None
    metadata: dict[str, Any]
    created_at: datetime
    completed_at: datetime | None


class Chat(Answer):
    """A chat; ``share_id`` (its live share link, or null) only in its owner's view."""

    id: uuid.UUID
    title: str | None
    model: str
    system_prompt: str | None
    metadata: dict[str, Any]
    visibility: Literal["private", "org", "public"]
    share_id: str | None = None
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None
    tools: list[dict[str, Any]] | None = Field(default=None, description="The chat's default tools (a single "
                                               "chat's read only)")
    tool_choice: str | dict[str, Any] | None = None
    reasoning_effort: str | None = None


class ChatWithMessages(Chat):
    messages: list[Message]
    message_count: int


class ChatPage(Answer):
    """A page of a chat listing: ``total`` counts every match; ``offset`` is null on a page read with a
    cursor; ``next_cursor`` (null on the last page) asks for the page after this one."""

    items: list[Chat]
    total: int
    limit: int
    offset: int | None
    next_cursor: str | None


class MessageList(Answer):
    items: list[Message]
    total: int
    limit: int
    offset: int


class Share(Answer):
    """A chat's share link: its id and the URL of its read (``GET /v1/shared/{share_id}``)."""

    share_id: str
    url: str


class SharedMessage(Answer):
    role: Literal["user", "assistant", "system", "tool"]
    content: str
    parts: list[dict[str, Any]]
    created_at: datetime


class SharedChat(Answer):
    """A public chat through its share link: its title and messages, nothing more."""

    title: str | None
    messages: list[SharedMessage]


class Stats(Answer):
    total_chats: int
    active_chats: int
    deleted_chats: int
    total_messages: int
    total_tokens: int


class TurnError(Answer):
    code: str
    message: str


class TurnAnswer(Answer):
    """A turn answered as one body (``Accept: application/json``); ``error`` when the reply failed."""

    chat_id: uuid.UUID
    user_message: Message
    assistant_message: Message
    error: TurnError | None = None


class Stopped(Answer):
    stopped: bool


class Budget(Answer):
    period: Literal["day", "month"]
    limit: int | None
    used: int
    reserved: int
    remaining: int | None
    resets_at: datetime
    resets_in_s: int


class RequestsPerMinute(Answer):
    limit: int | None
    used: int
    remaining: int | None


class ConcurrentStreams(Answer):
    limit: int | None
    active: int


class UsageReport(Answer):
    user_id: str
    org_id: str
    user_tokens: Budget
    org_tokens: Budget
    requests_per_minute: RequestsPerMinute
    org_requests_per_minute: RequestsPerMinute
    concurrent_streams: ConcurrentStreams


class LedgerSums(Answer):
    input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    charged_tokens: int
    requests: int


class LedgerGroup(Answer):
    """One group's sums: ``key`` is a UTC day (``2026-05-01``), a model or a user id."""

    key: str
    input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    charged_tokens: int
    requests: int


class LedgerReport(Answer):
    """The ledger summed from ``from`` up to ``to`` by ``group_by``: the org's (``scope`` org, for an admin)
    or the caller's own; groups in the order of their keys. With ``Accept: text/csv``, CSV: a header row
    (the grouping, then the sums), then a row a group."""

    scope: Literal["org", "user"]
    org_id: str
    user_id: str | None
    start: datetime = Field(alias="from")
    end: datetime = Field(alias="to")
    group_by: Literal["day", "model", "user"]
    groups: list[LedgerGroup]
    totals: LedgerSums


class QuotaDefaults(Answer):
    tokens_per_period: int | None
    period: Literal["day", "month"]
    requests_per_minute: int | None
    max_concurrent_streams: int | None


class Quota(QuotaDefaults):
    scope: Literal["user", "org"]
    subject_id: str
    overridden: bool
    defaults: QuotaDefaults


class ModelEntry(Answer):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    has_credentials: bool


class ModelList(Answer):
    object: Literal["list"]
    data: list[ModelEntry]


class File(Answer):
    """An uploaded file: its bytes are at ``/v1/files/{id}/content``; ``sha256`` in hex."""

    id: uuid.UUID
    name: str
    media_type: Literal[FILE_TYPES]  # type: ignore[valid-type]
    size: int
    sha256: str
    created_at: datetime


class FilePage(Answer):
    """A page of the caller's files, newest first; ``next_cursor`` (null on the last page) asks for the next."""

    items: list[File]
    total: int
    limit: int
    offset: int
    next_cursor: str | None


class Health(Answer):
    status: Literal["ok"]


class Ready(Answer):
    status: Literal["ready"]
    checks: dict[str, str]


class ErrorDetail(Answer):
    code: str
    message: str
    status: int
    request_id: str
    details: Any = None


class Error(Answer):
    """Every refusal and failure of the gateway's own endpoints (the OpenAI-compatible ones answer in
    OpenAI's error shape)."""

    error: ErrorDetail


class OpenAIErrorDetail(Answer):
    message: str
    type: str
    param: str | None
    code: str
    request_id: str


class OpenAIError(Answer):
    """Refusals and failures of the OpenAI-compatible endpoints, in OpenAI's shape (its SDKs parse them)."""

    error: OpenAIErrorDetail


# The chat stream's events (``event:`` names), each ``data:`` one JSON object.
class StartEvent(Answer):
    chat_id: uuid.UUID
    user_message_id: uuid.UUID
    assistant_message_id: uuid.UUID
    model: str


class DeltaEvent(Answer):
    text: str


class ReasoningEvent(Answer):
    text: str


class ToolCallStartEvent(Answer):
    id: str
    name: str


class ToolCallDeltaEvent(Answer):
    """A fragment of the call's JSON arguments, as it came."""

    id: str
    arguments: str


class ToolCallEvent(Answer):
    """A whole call: sent when the model went on to text, another call, or its end. Arguments that are not
    JSON come as the raw string in ``input``, with ``input_error``."""

    id: str
    name: str
    input: Any
    input_error: str | None = None


class UsageEvent(Answer):
    input_tokens: int
    output_tokens: int


class DoneUsage(Answer):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    reasoning_tokens: int | None = None


class DoneEvent(Answer):
    assistant_message_id: uuid.UUID
    finish_reason: str
    usage: DoneUsage
    duration_ms: float


class ErrorEvent(Answer):
    code: str
    message: str


EVENTS: dict[str, type[Answer]] = {
    "start": StartEvent, "delta": DeltaEvent, "reasoning": ReasoningEvent, "tool_call_start": ToolCallStartEvent,
    "tool_call_delta": ToolCallDeltaEvent, "tool_call": ToolCallEvent, "usage": UsageEvent, "done": DoneEvent,
    "error": ErrorEvent,
}
CHAT_STREAM = (
    "Server-Sent Events, each with `id: <n>` (1, 2, ...), `event: <name>` and one JSON object as `data`: "
    "`start` (StartEvent); `delta` (DeltaEvent), `reasoning` (ReasoningEvent), `tool_call_start`, "
    "`tool_call_delta` and `tool_call` (ToolCall*Event) in stream order; `usage` (UsageEvent) when the provider "
    "reports it, then `done` (DoneEvent; `finish_reason` `tool_calls` when the model waits for results, posted "
    "back as `tool_results`) or one `error` (ErrorEvent). `: ping` comments keep a quiet stream alive. With "
    "`Accept: application/json` the turn is answered as one TurnAnswer instead."
)


class ResumeQuery(BaseModel):
    after: int | None = Field(default=None, ge=0, description="The last event seen (`Last-Event-ID` wins)")
    message_id: uuid.UUID | None = Field(default=None, description="The turn, by its assistant message id; "
                                         "the chat's current turn when absent")


@dataclass(frozen=True, slots=True)
class Operation:
    method: str
    path: str
    tag: str
    summary: str
    answer: type[BaseModel] | str | None = None  # a model (JSON), or a media type's description
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    status: int = 200
    errors: tuple[int, ...] = (401, 422)
    public: bool = False
    media_type: str = "application/json"
    also: tuple[str, ...] = ()  # further media types of the answer, chosen by Accept (or by what it is)
    upload: bool = False  # the body is a file (UPLOAD_BODY)


OPERATIONS = (
    Operation("GET", "/health", "Operations", "The process answers", Health, public=True, errors=()),
    Operation("GET", "/ready", "Operations", "PostgreSQL and Redis answer within 2 s", Ready, public=True,
              errors=(503,)),
    Operation("GET", "/metrics", "Operations", "Prometheus metrics, summed over workers",
              "Prometheus text format", public=True, errors=(), media_type="text/plain"),
    Operation("GET", "/openapi.json", "Operations", "This document", "OpenAPI 3.1", public=True, errors=()),
    Operation("GET", "/docs", "Operations", "A page that reads this document", "HTML", public=True, errors=(),
              media_type="text/html"),
    Operation("GET", "/", "Operations", "The demo chat page", "HTML", public=True, errors=(),
              media_type="text/html"),
    Operation("POST", "/dev/token", "Operations",
              "A token for a fresh demo user (only with embedded services or GATEWAY_DEV_MODE)",
              "`{token, user, org}`", public=True, errors=(404,)),
    Operation("POST", "/v1/chats", "Chats", "Create a chat", Chat, body=ChatCreate, status=201,
              errors=(401, 403, 413, 422)),
    Operation("GET", "/v1/chats", "Chats",
              "List chats, newest activity first (the trash newest deletion first), filtered; `scope=org` lists "
              "the org's shared chats; `next_cursor` pages on, each chat once",
              ChatPage, query=ChatList),
    Operation("GET", "/v1/chats/{chat_id}", "Chats",
              "A chat with a page of its messages: the caller's, or one shared with the caller's org",
              ChatWithMessages, query=ChatRead, errors=(401, 404, 422)),
    Operation("PATCH", "/v1/chats/{chat_id}", "Chats",
              "Change a chat's title, model, system prompt, metadata or visibility (its owner only)",
              Chat, body=ChatPatch, errors=(401, 404, 413, 422)),
    Operation("DELETE", "/v1/chats/{chat_id}", "Chats", "Delete a chat (soft; `permanent=true` erases it)",
              query=PermanentFlag, status=204, errors=(401, 404, 422)),
    Operation("GET", "/v1/chats/{chat_id}/messages", "Chats",
              "A page of a chat's messages: the caller's, or one shared with the caller's org", MessageList,
              query=MessagePage, errors=(401, 404, 422)),
    Operation("POST", "/v1/chats/{chat_id}/restore", "Chats", "Restore a deleted chat with its messages", Chat,
              errors=(401, 403, 404)),
    Operation("POST", "/v1/chats/{chat_id}/share", "Chats",
              "Share a chat by link (its owner only): the chat becomes public; an existing link is kept", Share,
              errors=(401, 404)),
    Operation("DELETE", "/v1/chats/{chat_id}/share", "Chats",
              "Revoke the chat's share link (its owner only); the chat stays public", status=204,
              errors=(401, 404)),
    Operation("GET", "/v1/shared/{share_id}", "Chats", "A public chat through its share link, without a token",
              SharedChat, public=True, errors=(404,)),
    Operation("GET", "/v1/stats", "Chats", "The caller's chat, message and token counts", Stats, errors=(401,)),
    Operation("POST", "/v1/chats/{chat_id}/messages", "Streaming", "Send a message; the reply streams",
              CHAT_STREAM, body=SendMessage, errors=(401, 404, 409, 413, 422, 429, 502, 503, 504),
              media_type="text/event-stream"),
    Operation("POST", "/v1/chat", "Streaming", "Send a message, creating the chat when `chat_id` is absent",
              CHAT_STREAM, body=ChatTurn, errors=(401, 403, 404, 409, 413, 422, 429, 502, 503, 504),
              media_type="text/event-stream"),
    Operation("POST", "/v1/chats/{chat_id}/stop", "Streaming", "Stop the chat's running reply, from any instance",
              Stopped, errors=(401, 404)),
    Operation("POST", "/v1/ui/chat", "Streaming", "The AI SDK's UI message stream protocol (v1), for `useChat`",
              "`data: {json}` chunks: start, text-start, text-delta..., text-end, finish or error; then "
              "`data: [DONE]`", body=UIChatRequest, errors=(401, 409, 413, 422, 429, 502, 503, 504),
              media_type="text/event-stream"),
    Operation("GET", "/v1/ui/chat/{chat_id}/stream", "Streaming",
              "Resume the AI SDK's stream of the chat's current turn (`useChat({resume: true})`): its chunks "
              "from its start, then live to its end; 204 when no turn is kept",
              "`data: {json}` chunks as POST /v1/ui/chat sends them", errors=(401, 404, 429, 503),
              media_type="text/event-stream"),
    Operation("GET", "/v1/chats/{chat_id}/stream", "Streaming",
              "Resume the chat's current turn, from any instance: its events after `Last-Event-ID` (or `after`), "
              "byte-identical to the originals, then live to `done` or `error`; 204 when none is kept",
              CHAT_STREAM, query=ResumeQuery, errors=(400, 401, 404, 429, 503), media_type="text/event-stream"),
    Operation("GET", "/v1/usage", "Quotas", "The caller's budgets, use, resets and active streams", UsageReport,
              errors=(401, 503)),
    Operation("GET", "/v1/usage/report", "Quotas",
              "The ledger summed by day, model or user over a range: the org's for an admin, else the caller's",
              LedgerReport, query=UsageReportQuery, errors=(401, 422, 503), also=("text/csv",)),
    Operation("GET", "/v1/admin/quotas/{scope}/{subject_id}", "Quotas", "A user's or the org's limits (admin)",
              Quota, errors=(401, 403, 422)),
    Operation("PUT", "/v1/admin/quotas/{scope}/{subject_id}", "Quotas",
              "Set a user's or the org's limits; null keeps the default (admin)", Quota, body=QuotaLimits,
              errors=(401, 403, 413, 422, 503)),
    Operation("POST", "/v1/files", "Files",
              "Upload a file: a form's `file` part, or the body itself in the file's Content-Type (`name` names "
              "it); PNG, JPEG, GIF, WebP, PDF or UTF-8 text, its bytes matching its type", File, query=UploadQuery,
              status=201, errors=(401, 403, 413, 415, 422), upload=True),
    Operation("GET", "/v1/files", "Files", "List the caller's files, newest first", FilePage, query=FileList),
    Operation("GET", "/v1/files/{file_id}", "Files", "A file's description", File, errors=(401, 404)),
    Operation("GET", "/v1/files/{file_id}/content", "Files",
              "A file's bytes, in its media type, as an attachment (`Content-Disposition`)", "The file's bytes",
              errors=(401, 404), media_type=FILE_TYPES[0], also=FILE_TYPES[1:]),
    Operation("DELETE", "/v1/files/{file_id}", "Files",
              "Delete a file; a message that attached it names it in its text from then on", status=204,
              errors=(401, 404)),
    Operation("POST", "/v1/chat/completions", "OpenAI-compatible",
              "OpenAI's Chat Completions, streaming or not, from any provider; nothing is stored",
              "OpenAI's `chat.completion`, or `chat.completion.chunk` events ending with `data: [DONE]`",
              body=CompletionRequest, errors=(400, 401, 404, 413, 429, 502, 503, 504)),
    Operation("GET", "/v1/models", "OpenAI-compatible", "Each provider's known models", ModelList,
              errors=(401,)),
)

PATH_PARAMETERS: dict[str, dict[str, Any]] = {
    "chat_id": {"type": "string", "format": "uuid"},
    "share_id": {"type": "string", "pattern": "^[A-Za-z0-9_-]{16,64}$"},
    "scope": {"type": "string", "enum": ["user", "org"]},
    "subject_id": {"type": "string", "minLength": 1, "maxLength": 200},
    "file_id": {"type": "string", "format": "uuid"},
}
# An upload's body: a form with its ``file`` part, or the file's bytes in its own media type.
UPLOAD_BODY = {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "contentMediaType": "application/octet-stream",
                 "description": "The file; its part's Content-Type is its type, its filename its name"}}}},
    **{media_type: {"schema": {"type": "string", "contentMediaType": media_type}} for media_type in FILE_TYPES},
}}
ERROR_TEXT = {
    400: "Refused (OpenAI's error shape)", 401: "No valid token", 403: "Forbidden, or the chat limit reached",
    404: "Not found (another tenant's chat is answered the same)", 409: "A reply is already streaming in the chat, or the chat already holds the message's client_message_id",
    413: "The body is too large", 415: "The file's type is not supported, or its bytes are not of it", 422: "Invalid input (with `details`)", 429: "Over a quota (with Retry-After)",
    502: "The provider failed before the first token", 503: "A store is unavailable",
    504: "The provider timed out before the first token",
}


def _query_parameters(model: type[BaseModel], schemas: dict[str, Any]) -> list[dict[str, Any]]:
    properties = schemas[model.__name__]["properties"]
    return [{"name": name, "in": "query", "required": False, "schema": schema}
            for name, schema in properties.items()]


@functools.cache
def document() -> dict[str, Any]:
    models: list[type[BaseModel]] = [*EVENTS.values(), Error, OpenAIError]
    for operation in OPERATIONS:
        models += [m for m in (operation.body, operation.query, operation.answer)
                   if isinstance(m, type) and m not in models]
    _, definitions = models_json_schema([(m, "validation") for m in models],
                                        ref_template="#/components/schemas/{model}")
    schemas: dict[str, Any] = definitions["$defs"]
    paths: dict[str, dict[str, Any]] = {}
    for operation in OPERATIONS:
        spec: dict[str, Any] = {"tags": [operation.tag], "summary": operation.summary,
                                "operationId": _operation_id(operation)}
        parameters = [{"name": name, "in": "path", "required": True, "schema": PATH_PARAMETERS[name]}
                      for name in re.findall(r"{(\w+)}", operation.path)]
        if operation.query is not None:
            parameters += _query_parameters(operation.query, schemas)
        if parameters:
            spec["parameters"] = parameters
        if operation.upload:
            spec["requestBody"] = UPLOAD_BODY
        if operation.body is not None:
            spec["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{operation.body.__name__}"}}}}
        error = {"$ref": f"#/components/schemas/{'OpenAIError' if operation.path in OPENAI_PATHS else 'Error'}"}
        spec["responses"] = {str(operation.status): _answer(operation)} | {
            str(status): {"description": ERROR_TEXT[status], "content": {"application/json": {"schema": error}}}
            for status in operation.errors}
        if operation.public:
            spec["security"] = []
        paths.setdefault(operation.path, {})[operation.method.lower()] = spec
    return {
        "openapi": "3.1.0",
        "info": {"title": "Streamgate", "version": importlib.metadata.version("streamgate"),
                 "description": "A streaming gateway for LLM chat. The details are in docs/api.md."},
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}},
        "security": [{"bearer": []}],
    }


def _operation_id(operation: Operation) -> str:
    words = re.sub(r"[{}]", "", operation.path).replace(".", "_").split("/")
    return "_".join([operation.method.lower(), *filter(None, words)]).replace("-", "_") or "get_root"


def _answer(operation: Operation) -> dict[str, Any]:
    if operation.status == 204:
        return {"description": "No content"}
    if isinstance(operation.answer, type):
        schema = {"$ref": f"#/components/schemas/{operation.answer.__name__}"}
        return {"description": operation.answer.__doc__ or operation.answer.__name__,
                "content": {"application/json": {"schema": schema}} | {
                    media_type: {"schema": {"type": "string"}} for media_type in operation.also}}
    media_types = (operation.media_type, *operation.also)
    return {"description": operation.answer or "", "content": {media_type: {} for media_type in media_types}}


async def openapi(request: Request) -> Response:
    return JSONBody(document())


async def docs(request: Request) -> Response:
    return FileResponse(STATIC / "docs.html", headers={"Cache-Control": "no-cache"})


routes = [Route("/openapi.json", openapi), Route("/docs", docs)]
