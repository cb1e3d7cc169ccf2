"""The OpenAI-compatible surface: ``POST /v1/chat/completions`` and ``GET /v1/models``.

Any provider answers in OpenAI's exact chunk format, so the official ``openai`` SDKs and load-test tools
work by changing only their base URL. Auth, quotas, cancellation on disconnect and the usage ledger are the
chat stream's; nothing is stored in chats. Tools (``tools``, ``tool_choice``, assistant ``tool_calls`` and
``tool`` messages) are translated for each vendor, and the calls a model makes stream back as OpenAI's
``tool_calls`` deltas. ``reasoning_effort`` goes to each vendor's own form, and the model's reasoning comes
back as ``delta.reasoning_content`` (``message.reasoning_content`` whole; its tokens in
``usage.completion_tokens_details.reasoning_tokens``), the field DeepSeek, LiteLLM and most clients read.
``response_format`` (``json_object``, ``json_schema``) goes to each vendor's own
structured output. Refused with a 400: the legacy ``functions``, ``n`` > 1, log probabilities and audio.
"""

from __future__ import annotations

import mimetypes
import time
import urllib.parse
import uuid
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.api.schemas import (
    MAX_TOKENS,
    NamedToolChoice,
    ReasoningEffort,
    ToolSpec,
    attachment_url_error,
    parse_body,
)
from gateway.edge.auth import principal_of
from gateway.edge.errors import GatewayError
from gateway.edge.responses import JSONBody
from gateway.services import services_of
from gateway.streaming.dispatch import (
    admit,
    call_provider,
    event_stream,
    resolve_model,
    start_turn,
    token_estimate,
    upstream_failure,
)
from gateway.streaming.turns import Turn
from providers.base import (
    ATTACHMENT_TYPES,
    IMAGE_TYPES,
    Attachment,
    ChatMessage,
    ProviderError,
    ProviderRequest,
    ReasoningDelta,
    ResponseFormat,
    Tool,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from storage.chats import Owner

# Our endings, as OpenAI's finish reasons (it has no word for a cancelled or interrupted reply).
FINISH = {"stop": "stop", "length": "length", "content_filter": "content_filter", "tool_calls": "tool_calls"}


class BadRequest(GatewayError):
    code, status, message = "unsupported_parameter", 400, "This parameter is not supported"


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    arguments: str = "{}"


class CompletionToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    type: Literal["function"] = "function"
    function: FunctionCall


class CompletionMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[CompletionToolCall] | None = Field(default=None, max_length=128)
    tool_call_id: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormatSpec(BaseModel):
    """``text``, ``json_object`` (any JSON object) or ``json_schema`` (JSON that matches ``schema``)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The Chat Completions request. Harmless unknown fields are ignored, as OpenAI does."""

    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    messages: list[CompletionMessage] = Field(min_length=1, max_length=1000)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | list[str] | None = None
    user: str | None = None
    # Fields that would change the meaning of the answer; refused unless harmless.
    n: int | None = None
    tools: list[ToolSpec] | None = Field(default=None, max_length=128)
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # the vendors' default (parallel calls allowed) either way
    functions: list[Any] | None = None
    function_call: Any = None
    logprobs: bool | None = None
    response_format: ResponseFormatSpec | None = None
    reasoning_effort: ReasoningEffort | None = None
    audio: Any = None
    modalities: list[str] | None = None


def refuse_unsupported(body: CompletionRequest) -> None:
    refusals = {
        "n": body.n not in (None, 1),
        "functions": bool(body.functions) or body.function_call not in (None, "none"),  # the legacy form of tools
        "tool_choice": body.tool_choice not in (None, "none", "auto") and not body.tools,
        "logprobs": bool(body.logprobs),
        "response_format": body.response_format is not None and body.response_format.type == "json_schema"
        and body.response_format.json_schema is None,
        "audio": body.audio is not None or (body.modalities or ["text"]) != ["text"],
        "stop": isinstance(body.stop, list) and len(body.stop) > 4,
    }
    for param, refused in refusals.items():
        if refused:
            raise BadRequest(f"'{param}' is not supported by this gateway",
                             details=[{"loc": [param], "msg": "not supported", "type": "unsupported"}])


def unsupported(message: str, loc: list[str | int]) -> BadRequest:
    return BadRequest(message, details=[{"loc": loc, "msg": message, "type": "unsupported"}])


def text_of(message: CompletionMessage, attachments: list[Attachment] | None = None) -> str:
    """The message's text; its ``image_url`` and ``file`` parts go to ``attachments`` when it may have them
    (a user's message), and are refused otherwise."""
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    for index, part in enumerate(message.content):
        if part.type != "text":
            if attachments is None or part.type not in ("image_url", "file"):
                raise unsupported(f"Content parts of type '{part.type}' are not supported in a {message.role} "
                                  "message", ["messages", "content", index, "type"])
            attachments.append(attachment_of(part, ["messages", "content", index]))
    return "".join(part.text or "" for part in message.content)


def attachment_of(part: ContentPart, loc: list[str | int]) -> Attachment:
    """An ``image_url`` part (a link or a data URL; a link's type is read from its name, JPEG when it says
    nothing) or a ``file`` part carrying a PDF as a data URL (``file_data``). ``detail`` is not kept."""
    fields = (part.model_extra or {}).get(part.type)
    url = fields.get("url" if part.type == "image_url" else "file_data") if isinstance(fields, dict) else None
    if not isinstance(url, str) or not url:
        raise unsupported(f"A '{part.type}' part needs its URL or data (file ids are not supported)", loc)
    if url.startswith("data:"):
        media_type = url[5:].partition(";")[0]
    else:
        media_type = mimetypes.guess_type(urllib.parse.urlsplit(url).path)[0] or "image/jpeg"
    name = fields.get("filename") if isinstance(fields, dict) else None
    if media_type not in ATTACHMENT_TYPES or (part.type == "image_url") != (media_type in IMAGE_TYPES):
        raise unsupported(f"Attachments of type '{media_type}' are not supported", loc)
    if error := attachment_url_error(media_type, url):
        raise unsupported(f"The attachment's URL {error}", loc)
    return Attachment(name if isinstance(name, str) and name else part.type, media_type, url)


def message_of(message: CompletionMessage, index: int) -> ChatMessage:
    """A user, assistant (with its tool calls) or tool (a call's result) message."""
    if message.role == "function":
        raise unsupported("'function' messages are not supported: use tools", ["messages", index, "role"])
    if message.role == "tool":
        if message.tool_call_id is None:
            raise unsupported("A tool message needs its 'tool_call_id'", ["messages", index, "tool_call_id"])
        return ChatMessage("tool", text_of(message), tool_call_id=message.tool_call_id)
    if message.role == "user":
        attachments: list[Attachment] = []
        return ChatMessage("user", text_of(message, attachments), tuple(attachments))
    calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or ())
    return ChatMessage("assistant", text_of(message), tool_calls=calls)


def provider_request(body: CompletionRequest, model_name: str) -> ProviderRequest:
    system, messages = [], []
    for index, message in enumerate(body.messages):
        if message.role in ("system", "developer"):
            system.append(text_of(message))
        else:
            messages.append(message_of(message, index))
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    tools = tuple(Tool(t.function.name, t.function.description, t.function.parameters) for t in body.tools or ())
    choice = body.tool_choice
    forced = choice.function.name if isinstance(choice, NamedToolChoice) else None
    if forced is not None and forced not in {tool.name for tool in tools}:
        raise unsupported(f"tool_choice names '{forced}', which is not among the tools", ["tool_choice"])
    return ProviderRequest(
        model_name, messages, system="\n\n".join(system) or None,
        max_tokens=body.max_completion_tokens or body.max_tokens, temperature=body.temperature,
        top_p=body.top_p, stop=stop, tools=tools,
        tool_choice="required" if forced else choice if tools else None,  # type: ignore[arg-type]
        forced_tool=forced, response_format=response_format_of(body.response_format),
        reasoning_effort=body.reasoning_effort,
    )


def response_format_of(spec: ResponseFormatSpec | None) -> ResponseFormat | None:
    if spec is None or spec.type == "text":
        return None
    if spec.type == "json_object":
        return ResponseFormat("json_object")
    schema = spec.json_schema
    assert schema is not None  # a json_schema format without its schema is refused before
    return ResponseFormat("json_schema", schema.json_schema, schema.name, schema.strict)


# The constant ends of a chunk, without and with ``"usage":null`` (``stream_options.include_usage``).
_USAGE_TAIL = (b"}\n\n", b',"usage":null}\n\n')
_DELTA_SUFFIX = tuple(b'},"logprobs":null,"finish_reason":null}]' + tail for tail in _USAGE_TAIL)


class CompletionChunks:
    """OpenAI's ``chat.completion.chunk`` stream; the per-token frame is two constant byte strings and a dump."""

    __slots__ = ("head", "include_usage", "prefix", "suffix", "usage_tail")

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        head = orjson.dumps({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                             "model": model, "system_fingerprint": None})[:-1]
        self.head = b"data: " + head
        self.include_usage = include_usage
        self.usage_tail = _USAGE_TAIL[include_usage]
        self.prefix = self.head + b',"choices":[{"index":0,"delta":{"content":'
        self.suffix = _DELTA_SUFFIX[include_usage]

    def _choice(self, delta: bytes, finish: bytes = b"null") -> bytes:
        return (self.head + b',"choices":[{"index":0,"delta":' + delta + b',"logprobs":null,"finish_reason":'
                + finish + b"}]" + self.usage_tail)

    def start(self, turn: Turn) -> bytes:
        return self._choice(b'{"role":"assistant","content":""}')

    def delta(self, text: str) -> bytes:
        return self.prefix + orjson.dumps(text) + self.suffix

    def usage(self, usage: Usage) -> None:
        return None  # OpenAI reports usage once, after the last choice

    def reasoning(self, delta: ReasoningDelta) -> bytes | None:
        if not delta.text:
            return None  # a signature or redacted reasoning: nothing Chat Completions can carry
        return self._choice(b'{"reasoning_content":' + orjson.dumps(delta.text) + b"}")

    def tool_done(self, call: ToolCall) -> None:
        return None

    def tool_call(self, delta: ToolCallDelta, call_id: str) -> bytes:
        call: dict[str, Any] = {"index": delta.index}
        if delta.id is not None or delta.name is not None:  # the call's first piece
            call |= {"id": call_id, "type": "function", "function": {"name": delta.name, "arguments": delta.arguments}}
        else:
            call["function"] = {"arguments": delta.arguments}
        return self._choice(b'{"tool_calls":' + orjson.dumps([call]) + b"}")

    def done(self, turn: Turn) -> bytes:
        frames = self._choice(b"{}", orjson.dumps(FINISH.get(turn.ending or "", "stop")))
        if self.include_usage:
            frames += self.head + b',"choices":[],"usage":' + orjson.dumps(usage_object(turn)) + b"}\n\n"
        return frames + b"data: [DONE]\n\n"

    def error(self, turn: Turn, error: ProviderError) -> bytes:
        body = {"error": {"message": error.message, "type": "api_error", "param": None, "code": error.code}}
        return b"data: " + orjson.dumps(body) + b"\n\n"


def usage_object(turn: Turn) -> dict[str, Any]:
    usage, _ = turn.final_usage()
    body: dict[str, Any] = {"prompt_tokens": usage.input_tokens, "completion_tokens": usage.output_tokens,
                            "total_tokens": usage.input_tokens + usage.output_tokens}
    if usage.reasoning_tokens is not None:
        body["completion_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    return body


def completion_object(turn: Turn, completion_id: str, created: int) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": turn.text, "refusal": None}
    if reasoning := turn.reasoning_text:
        message["reasoning_content"] = reasoning
    if calls := turn.tool_calls:
        message["content"] = turn.text or None
        message["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in calls]
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": turn.model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": FINISH.get(turn.ending or "", "stop")}],
        "usage": usage_object(turn),
    }


async def chat_completions(request: Request) -> Response:
    principal = principal_of(request)
    body = await parse_body(request, CompletionRequest)
    refuse_unsupported(body)
    services = services_of(request)
    provider, model_name = resolve_model(services.streams, body.model)
    call = provider_request(body, model_name)
    if call.response_format is not None and call.response_format.kind not in provider.response_formats:
        raise unsupported(f"{body.model} cannot hold its answer to a {call.response_format.kind} format: give a "
                          "json_schema", ["response_format", "type"])
    owner = Owner(principal.org_id, principal.user_id)
    estimate = token_estimate(services.streams, call.prompt_chars, call.max_tokens)
    admission = await admit(services.streams, owner, uuid.uuid4(), estimate)
    turn = Turn(body.model, call, call_provider(provider, call), services.streams.finish)
    turn.ticket, turn.owner = admission.ticket, owner
    await start_turn(services.streams, turn, body.model)
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        codec = CompletionChunks(completion_id, created, turn.model, include_usage)
        # Not resumable: a client that hangs up ends its turn, whatever the deployment's default.
        return event_stream(services.streams, turn, codec, admission.headers, on_disconnect="cancel")
    await turn.collect()
    if turn.error is not None:
        raise upstream_failure(turn.error)
    return JSONBody(completion_object(turn, completion_id, created), headers=admission.headers)


async def list_models(request: Request) -> Response:
    principal_of(request)
    providers = services_of(request).providers
    data = [
        {"id": f"{provider.name}/{model}", "object": "model", "created": 0, "owned_by": provider.name,
         "has_credentials": provider.has_credentials}
        for provider in (providers.get(name) for name in providers.names()) for model in provider.models
    ]
    return JSONBody({"object": "list", "data": data})


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
]
