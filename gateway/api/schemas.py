"""Request bodies and query strings, validated at the edge with pydantic.

Past 400 lines because most of it is data: one model per body or query the API takes, with the checks
that keep bad input to a 400 shared between them.
"""

from __future__ import annotations

import binascii
import functools
import json
import re
import uuid
from base64 import b64decode
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, TypeVar

import orjson
from jsonschema.exceptions import SchemaError
from jsonschema.validators import Draft202012Validator, validator_for
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from starlette.requests import Request

from gateway.edge.errors import ChatNotFound, PayloadTooLarge, ValidationFailed
from providers import base as providers
from storage.chats import Visibility

METADATA_MAX_BYTES = 16 * 1024

Title = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
ModelName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]+/\S+$", max_length=200)]
MAX_SYSTEM_PROMPT_CHARS = 20_000
# The largest page offset: PostgreSQL's OFFSET is a bigint.
MAX_OFFSET = 2**63 - 1
# The most output any request may ask for, on every path: past it a quota estimate stops being a count.
MAX_TOKENS = 1_000_000
SystemPrompt = Annotated[str, StringConstraints(max_length=MAX_SYSTEM_PROMPT_CHARS)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class Query(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _check_metadata(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None:
        return value
    try:
        size = len(orjson.dumps(value))
    except orjson.JSONEncodeError:  # nested past what it writes, or an integer past 64 bits
        raise ValueError("metadata must be JSON the gateway can store: at most 254 levels deep, 64-bit integers") from None
    if size > METADATA_MAX_BYTES:
        raise ValueError(f"metadata must serialise to at most {METADATA_MAX_BYTES} bytes")
    return value


class ChatCreate(Body):
    title: Title | None = None
    model: ModelName | None = None
    system_prompt: SystemPrompt | None = None
    metadata: dict[str, Any] | None = None
    visibility: Visibility = "private"

    _metadata = field_validator("metadata")(_check_metadata)


class ChatList(Query):
    """``scope``: ``own`` (the caller's chats) or ``org`` (the live chats shared with the caller's org,
    visibility org or public, any owner's). ``status``: ``active``, ``deleted`` (the trash; ``deleted=true``
    says the same) or ``all``. Dates are RFC 3339 date-times or dates (their midnight UTC), bounds excluded.
    ``streaming``: whether a reply of the chat is streaming now. ``cursor``: a page's ``next_cursor``, for the
    page after it, with the same filters and without ``offset``."""

    limit: int = Field(default=20, ge=1, le=100)
    offset: int = Field(default=0, ge=0, le=MAX_OFFSET)
    q: Annotated[str, StringConstraints(strip_whitespace=True, max_length=200)] = ""
    deleted: bool = False
    scope: Literal["own", "org"] = "own"
    status: Literal["active", "deleted", "all"] | None = None
    model: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    updated_after: datetime | None = None
    updated_before: datetime | None = None
    streaming: bool | None = None
    cursor: Annotated[str, StringConstraints(min_length=1, max_length=8192)] | None = None

    @field_validator("created_after", "created_before", "updated_after", "updated_before", mode="before")
    @classmethod
    def _instant(cls, value: Any) -> Any:
        return parse_instant(value)

    @model_validator(mode="after")
    def _filters_agree(self) -> ChatList:
        if self.deleted and self.status not in (None, "deleted"):
            raise ValueError("deleted=true means status=deleted")
        if self.scope == "org" and self.listed_status != "active":
            raise ValueError("scope=org lists live chats only; the trash is the owner's (scope=own)")
        if self.cursor is not None and "offset" in self.model_fields_set:
            raise ValueError("a cursor says where its page starts: send it without offset")
        return self

    @property
    def listed_status(self) -> Literal["active", "deleted", "all"]:
        return "deleted" if self.deleted else self.status or "active"


class MessagePage(Query):
    limit: int = Field(default=100, ge=1, le=1000)
    offset: int = Field(default=0, ge=0, le=MAX_OFFSET)
    order: Literal["asc", "desc"] = "asc"


class ChatRead(Query):
    message_limit: int = Field(default=100, ge=1, le=1000)
    message_offset: int = Field(default=0, ge=0, le=MAX_OFFSET)
    order: Literal["asc", "desc"] = "asc"


class PermanentFlag(Query):
    permanent: bool = False


Model = TypeVar("Model", bound=BaseModel)


def validation_details(error: ValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
        for e in error.errors(include_url=False, include_input=False)
    ]


def parse_query(request: Request, model: type[Model]) -> Model:
    query = dict(request.query_params)
    refuse_unstorable(query, [])
    try:
        return model.model_validate(query)
    except ValidationError as error:
        raise ValidationFailed(details=validation_details(error)) from None


async def read_json(request: Request, max_bytes: int) -> Any:
    """The request's JSON body, refused with 413 past ``max_bytes`` without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise PayloadTooLarge()
    try:
        data = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        data = json_with_lone_surrogates(body)
    refuse_unstorable(data, [])
    return data


def json_with_lone_surrogates(body: bytes | bytearray) -> Any:
    """A body orjson refused: valid JSON all the same when its only fault is a lone surrogate (which
    ``refuse_unstorable`` then names), else a 422."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise ValidationFailed("The request body is not valid JSON") from None


# What PostgreSQL cannot store in text or jsonb: NUL, and half of a surrogate pair.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def refuse_unstorable(data: Any, loc: list[str | int]) -> None:
    """422 naming the first field (or key) of ``data`` whose text holds a NUL or a lone surrogate. Walked
    without recursion: a client chooses the nesting."""
    stack: list[tuple[Any, list[str | int]]] = [(data, loc)]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if _UNSTORABLE.search(value):
                raise ValidationFailed(details=[{"loc": where, "type": "unstorable_text",
                                                 "msg": "must not hold a NUL character or a lone surrogate"}])
        elif isinstance(value, dict):
            for key, item in value.items():
                stack.append((item, [*where, key]))
                # A key is checked before its value, and named escaped: the error body must be valid UTF-8.
                stack.append((key, [*where, key.encode("utf-8", "backslashreplace").decode()]))
        elif isinstance(value, list):
            stack.extend((item, [*where, n]) for n, item in enumerate(value))


async def parse_body(request: Request, model: type[Model]) -> Model:
    data = await read_json(request, request.app.state.settings.max_body_bytes)
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ValidationFailed(details=validation_details(error)) from None


def chat_id_of(request: Request) -> uuid.UUID:
    """The ``{chat_id}`` path parameter; a malformed id names no chat, so it is a 404 like a missing one."""
    try:
        return uuid.UUID(request.path_params["chat_id"])
    except ValueError:
        raise ChatNotFound() from None


def attachment_url_error(media_type: str, url: str) -> str | None:
    """Why ``url`` cannot carry a ``media_type`` file to a model: it must be an http(s) link, or a data URL
    of that very type in base64. None when it can."""
    if url.startswith(("https://", "http://")):
        return None
    head, _, data = url.partition(",")
    if head != f"data:{media_type};base64":
        return f"must be an http(s) link or a data:{media_type};base64 URL"
    try:
        b64decode(data, validate=True)
    except binascii.Error:
        return "holds data that is not valid base64"
    return None


def _optional(schema: dict[str, Any]) -> None:
    """A field that may be left out but is never null: described as its value's schema alone (not
    ``anyOf`` it and null), without its default. (Typed ``X | None`` for pydantic's errors to name the field
    alone; a union hidden from the schema would add its member's name to the error's ``loc``.)"""
    schema.pop("default", None)
    schema.update(next(s for s in schema.pop("anyOf", [{}]) if s.get("type") != "null"))


class Attachment(Body):
    """What the model is to see beside the message: an image or a PDF by link or data URL (``name``,
    ``media_type``, ``url``), or a file uploaded to ``/v1/files`` (``file_id`` alone). Stored with the
    message and sent with it on every turn."""

    file_id: uuid.UUID | None = Field(default=None, json_schema_extra=_optional)
    name: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = Field(
        default=None, json_schema_extra=_optional)
    media_type: Literal[providers.ATTACHMENT_TYPES] | None = Field(  # type: ignore[valid-type]
        default=None, json_schema_extra=_optional)
    url: Annotated[str, StringConstraints(min_length=1, max_length=4096)] | None = Field(
        default=None, json_schema_extra=_optional)

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str | None, info: ValidationInfo) -> str | None:
        media_type = info.data.get("media_type")
        if url is not None and media_type is not None and (error := attachment_url_error(media_type, url)):
            raise ValueError(f"url {error}")
        return url

    @model_validator(mode="after")
    def _one_form(self) -> Attachment:
        linked = [field for field in ("name", "media_type", "url") if getattr(self, field) is not None]
        if self.file_id is not None and linked:
            raise ValueError(f"file_id stands alone: no {', '.join(linked)} beside it")
        if self.file_id is None and len(linked) < 3:
            raise ValueError("needs file_id, or name, media_type and url")
        return self

    def for_model(self) -> providers.Attachment:
        """A linked attachment (``url``) as the model gets it; an uploaded file's come from gateway/api/files.py."""
        assert self.name is not None and self.media_type is not None and self.url is not None
        return providers.Attachment(self.name, self.media_type, self.url)


# A send's model: any name, which its provider then checks (404 ``model_not_found`` for one no provider
# serves, 422 for options it refuses).
SendModel = Annotated[str, StringConstraints(min_length=1, max_length=200)]
MAX_TOOLS = 128


def check_parameters(schema: dict[str, Any]) -> dict[str, Any]:
    """A tool's parameters: a JSON Schema (checked against its draft's metaschema, 2020-12 unless
    ``$schema`` names another) of type ``object``, as every vendor takes."""
    if schema.get("type") != "object":
        raise ValueError('must be a JSON Schema of "type": "object"')
    if not isinstance(schema.get("$schema", ""), str):
        raise ValueError("has a $schema that is not a URI")
    if problem := schema_problem(orjson.dumps(storable_json(schema))):
        raise ValueError(problem)
    return schema


@functools.lru_cache(maxsize=1024)
def schema_problem(schema: bytes) -> str | None:
    """Why a schema (as JSON) is not valid, or None. Cached: checking one against its metaschema takes
    0.6 ms, and an agent sends the same tools with every step."""
    parsed = orjson.loads(schema)
    try:
        validator_for(parsed, default=Draft202012Validator).check_schema(parsed)
    except SchemaError as error:
        return f"is not a valid JSON Schema: {error.message[:200]}"
    except RecursionError:
        return "is nested too deeply"
    return None


def storable_json(value: Any) -> Any:
    """A client's JSON that is stored and sent on as JSON: refused when it cannot be written back as JSON
    (nested past 255 levels, an integer past 64 bits)."""
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError as error:
        raise ValueError(f"cannot be stored as JSON: {error}") from None
    return value


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: Annotated[str, StringConstraints(max_length=4096)] | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})

    _parameters = field_validator("parameters")(check_parameters)

    @model_validator(mode="after")
    def _storable(self) -> FunctionSpec:
        storable_json(self.model_extra)
        return self


class ToolSpec(BaseModel):
    """A tool in OpenAI's function format: ``{"type": "function", "function": {name, description?,
    parameters}}``."""

    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: FunctionSpec

    def for_model(self) -> providers.Tool:
        return providers.Tool(self.function.name, self.function.description, self.function.parameters)


class ToolName(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Annotated[str, StringConstraints(min_length=1, max_length=64)]


class NamedToolChoice(BaseModel):
    """``{"type": "function", "function": {"name": ...}}``: the model must call that tool."""

    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: ToolName


ToolChoice = Literal["auto", "none", "required"] | NamedToolChoice
ReasoningEffort = Literal["minimal", "low", "medium", "high"]


def tool_refusal(tools: list[ToolSpec] | None, choice: ToolChoice | None, loc: list[str | int]) -> None:
    """422 for a tool named twice, or a ``tool_choice`` naming none of the tools (``loc`` before each)."""
    seen: set[str] = set()
    for index, tool in enumerate(tools or ()):
        if tool.function.name in seen:
            raise ValidationFailed(details=[{"loc": [*loc, "tools", index, "function", "name"],
                                             "msg": f"tool {tool.function.name!r} is named twice", "type": "duplicate"}])
        seen.add(tool.function.name)
    choice_refusal(choice, seen, loc)


def choice_refusal(choice: ToolChoice | None, names: set[str], loc: list[str | int]) -> None:
    """422 for a ``tool_choice`` naming none of the tools ``names``, or asking for a call with none."""
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise ValidationFailed(details=[{"loc": [*loc, "tool_choice", "function", "name"],
                                         "msg": f"names {choice.function.name!r}, which is not among the tools",
                                         "type": "unknown_tool"}])
    if choice is not None and choice not in ("auto", "none") and not names:
        raise ValidationFailed(details=[{"loc": [*loc, "tool_choice"], "msg": "asks for a call, but there are no tools",
                                         "type": "no_tools"}])


class AgentOptions(Body):
    """The tools a reply may call and how hard the model reasons: on a send, or a chat's defaults."""

    tools: list[ToolSpec] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    reasoning_effort: ReasoningEffort | None = None

    @model_validator(mode="after")
    def _tools_agree(self) -> AgentOptions:
        if self.tools:  # without tools, the choice may name a chat's default tools (checked at the send)
            tool_refusal(self.tools, self.tool_choice, [])
        return self


class ChatPatch(ChatCreate, AgentOptions):
    """A chat's fields, and its agent defaults (``tools``, ``tool_choice``, ``reasoning_effort``; null
    clears one)."""


class TurnOptions(AgentOptions):
    """What a send may say about the reply, beside the message itself."""

    model: SendModel | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(default=None, ge=0, le=2)
    attachments: list[Attachment] = Field(default_factory=list, max_length=16)
    client_message_id: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    metadata: dict[str, Any] | None = None
    # The sender hanging up cancels the turn, or lets it run on unread (``GATEWAY_ON_DISCONNECT`` when absent).
    on_disconnect: Literal["cancel", "continue"] | None = None

    _metadata = field_validator("metadata")(_check_metadata)


class ToolResult(Body):
    """The result of a call the model made, posted back: ``output`` any JSON (a string stays a string)."""

    tool_call_id: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    output: Any
    is_error: bool = False

    _output = field_validator("output")(storable_json)


class SendMessage(TurnOptions):
    """``POST /v1/chats/{id}/messages``: a message, or the results of the calls the last reply made."""

    content: str = ""
    tool_results: list[ToolResult] | None = Field(default=None, min_length=1, max_length=MAX_TOOLS)


class ChatTurn(TurnOptions):
    """``POST /v1/chat``: a message to an existing chat, or to a new one when ``chat_id`` is absent."""

    message: str
    chat_id: uuid.UUID | None = None
    title: Title | None = None
    system_prompt: SystemPrompt | None = None


class QuotaLimits(Body):
    """``PUT /v1/admin/quotas/{scope}/{subject_id}``: null keeps the default from settings."""

    tokens_per_period: int | None = Field(default=None, ge=0, le=10**15)
    period: Literal["day", "month"] = "day"
    requests_per_minute: int | None = Field(default=None, ge=0, le=10**9)
    max_concurrent_streams: int | None = Field(default=None, ge=0, le=10**6)


REPORT_MAX_DAYS = 366
# RFC 3339 (a date-time with its offset), or a date alone. ASCII digits only: re's \d takes any script's.
_INSTANT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
                      r"(?:[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?(?:[Zz]|[+-][0-9]{2}:[0-9]{2}))?")


def parse_instant(value: Any) -> Any:
    """A query's RFC 3339 date-time, or a date (its midnight UTC), as a UTC datetime; anything else is
    refused, a date-time without an offset too."""
    if not isinstance(value, str):
        return value
    if not _INSTANT.fullmatch(value):
        raise ValueError("must be an RFC 3339 date-time with an offset (2026-05-01T00:00:00Z; a + sent as %2B) "
                         "or a date (2026-05-01)")
    try:
        moment = datetime.fromisoformat(value.upper())
        return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)
    except (ValueError, OverflowError):
        raise ValueError("is not a date or time of the calendar (years 1 to 9999)") from None


def month_start(moment: datetime, months_ahead: int = 0) -> datetime:
    """The start of the UTC month of ``moment``, or of the one ``months_ahead`` of it (past the calendar's
    end, its last moment)."""
    month = moment.month - 1 + months_ahead
    try:
        return datetime(moment.year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
    except ValueError:
        return datetime.max.replace(tzinfo=UTC)


def _this_month() -> datetime:
    return month_start(datetime.now(UTC))


class UsageReportQuery(Query):
    """``GET /v1/usage/report``: the ledger from ``from`` up to ``to`` (exclusive), at most 366 days,
    summed by ``group_by``."""

    start: datetime = Field(default_factory=_this_month, alias="from",
                            description="RFC 3339 date-time or date (UTC); by default the start of the current "
                                        "UTC month")
    end: datetime | None = Field(default=None, alias="to",
                                 description="RFC 3339 date-time or date (UTC), exclusive; by default the start "
                                             "of the UTC month after from's")
    group_by: Literal["day", "model", "user"] = "day"

    _instants = field_validator("start", "end", mode="before")(parse_instant)

    @field_validator("end")
    @classmethod
    def _within_a_year_of_start(cls, end: datetime | None, info: ValidationInfo) -> datetime | None:
        start = info.data.get("start")
        if start is None or end is None:
            return end
        if end < start:
            raise ValueError("must not be before from")
        if end - start > timedelta(days=REPORT_MAX_DAYS):
            raise ValueError(f"must be at most {REPORT_MAX_DAYS} days after from")
        return end

    def span(self) -> tuple[datetime, datetime]:
        """``from`` and ``to``, the latter by default the start of the UTC month after ``from``'s."""
        return self.start, self.end or month_start(self.start, 1)
