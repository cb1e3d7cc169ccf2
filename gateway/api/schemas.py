"""Request bodies and query strings, validated at the edge with pydantic."""

from __future__ import annotations

import binascii
import uuid
from base64 import b64decode
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from starlette.requests import Request

from gateway.edge.errors import ChatNotFound, PayloadTooLarge, ValidationFailed
from providers import base as providers

METADATA_MAX_BYTES = 16 * 1024

Title = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
ModelName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]+/\S+$", max_length=200)]
MAX_SYSTEM_PROMPT_CHARS = 20_000
# The most output any request may ask for, on every path: past it a quota estimate stops being a count.
MAX_TOKENS = 1_000_000
SystemPrompt = Annotated[str, StringConstraints(max_length=MAX_SYSTEM_PROMPT_CHARS)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class Query(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _check_metadata(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is not None and len(orjson.dumps(value)) > METADATA_MAX_BYTES:
        raise ValueError(f"metadata must serialise to at most {METADATA_MAX_BYTES} bytes")
    return value


class ChatCreate(Body):
    title: Title | None = None
    model: ModelName | None = None
    system_prompt: SystemPrompt | None = None
    metadata: dict[str, Any] | None = None

    _metadata = field_validator("metadata")(_check_metadata)


class ChatPatch(ChatCreate):
    pass


class ChatList(Query):
    limit: int = Field(default=20, ge=1, le=100)
    offset: int = Field(default=0, ge=0)
    q: Annotated[str, StringConstraints(strip_whitespace=True, max_length=200)] = ""
    deleted: bool = False


class MessagePage(Query):
    limit: int = Field(default=100, ge=1, le=1000)
    offset: int = Field(default=0, ge=0)
    order: Literal["asc", "desc"] = "asc"


class ChatRead(Query):
    message_limit: int = Field(default=100, ge=1, le=1000)
    message_offset: int = Field(default=0, ge=0)
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
    try:
        return model.model_validate(dict(request.query_params))
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
        return orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        raise ValidationFailed("The request body is not valid JSON") from None


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


class Attachment(Body):
    """An image or a PDF the model is to see; stored with the message and sent with it on every turn."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    media_type: Literal[providers.ATTACHMENT_TYPES]  # type: ignore[valid-type]
    url: Annotated[str, StringConstraints(min_length=1, max_length=4096)]

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str, info: ValidationInfo) -> str:
        media_type = info.data.get("media_type")
        if media_type is not None and (error := attachment_url_error(media_type, url)):
            raise ValueError(f"url {error}")
        return url

    def for_model(self) -> providers.Attachment:
        return providers.Attachment(self.name, self.media_type, self.url)


# A send's model: any name, which its provider then checks (404 ``model_not_found`` for one no provider
# serves, 422 for options it refuses).
SendModel = Annotated[str, StringConstraints(min_length=1, max_length=200)]


class TurnOptions(Body):
    """What a send may say about the reply, beside the message itself."""

    model: SendModel | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(default=None, ge=0, le=2)
    attachments: list[Attachment] = Field(default_factory=list, max_length=16)
    client_message_id: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    metadata: dict[str, Any] | None = None

    _metadata = field_validator("metadata")(_check_metadata)


class SendMessage(TurnOptions):
    content: str


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
