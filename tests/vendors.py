"""Fake vendor servers: tiny ASGI apps speaking OpenAI's, Anthropic's and Gemini's real streaming formats.

The model name picks a scenario: ``normal``, ``split-utf8`` (frames cut inside a multi-byte character),
``crlf``, ``pings``, ``error-frame``, ``drop`` (connection cut mid-stream), ``stall`` (goes silent),
``401``, ``429`` (with Retry-After: 7), ``500``, ``503``, ``529``, ``tools`` (text, then two tool calls),
``slow-<marker>`` (a long paced stream whose client going away is recorded under ``marker``) and
``slow-tools-<marker>`` (the same, a tool call's arguments in paced pieces; OpenAI and Anthropic, whose
calls stream) and ``tools-broken`` (OpenAI: a call whose arguments are not JSON).

Reasoning, each in the vendor's own form: ``reasoning`` (reasoning, then the text of ``normal``; OpenAI's as
``delta.reasoning_content`` with ``completion_tokens_details.reasoning_tokens``; Anthropic's a signed
thinking block and a redacted one; Gemini's ``thought`` parts, a ``thoughtSignature`` on a last empty text
part, and ``thoughtsTokenCount``), ``reasoning-alt`` (OpenAI's as ``delta.reasoning``, as vLLM 0.19.1+,
Ollama and OpenRouter send it; the others as ``reasoning``) and ``reasoning-tools`` (reasoning, then one
tool call: Gemini's signature on its ``functionCall`` part). Like Anthropic, its fake refuses with a 400 a
request whose thinking it would refuse (a budget under 1,024 or not under ``max_tokens``, a temperature
other than 1, a required tool) and one with thinking whose last assistant turn calls a tool without first
giving back its thinking.

Faults, each at the first byte (``-first``) or after two good tokens (``-mid``; ``drop`` and ``stall`` are
the mid-stream ones): ``drop-first`` (the head sent, then the connection cut before any body byte),
``stall-first`` (the head, then silence), ``garbage-first``/``garbage-mid`` (bytes that are neither SSE nor
JSON, then the end), ``shape-first``/``shape-mid`` (a well-formed SSE frame whose JSON is not an object),
``html`` (a 200 of ``text/html``, ended normally) and ``html-mid`` (two tokens, then an HTML page).

Past 400 lines because it speaks three vendors' formats, each with its errors, reasoning and tools.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anthropic.types
import openai.types.chat
import orjson
from google.genai import types
from openai.types.completion_usage import CompletionTokensDetails
from pydantic import TypeAdapter
from starlette.types import Receive, Scope, Send

VENDORS = ["openai", "anthropic", "gemini"]
TOKENS = ["Hello", ", w\u00f6rld", " \U0001f600", " done"]
TEXT = "".join(TOKENS)
PROMPT_TOKENS, OUTPUT_TOKENS = 5, len(TOKENS)
SLOW_TOKENS, SLOW_GAP_S = 200, 0.02


def _openai_chunk(choices: list[Any], **extra: Any) -> bytes:
    return b"data: " + orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                                     "model": "m", "choices": choices, **extra})


def _openai_delta(delta: dict[str, Any], finish: str | None = None) -> bytes:
    return _openai_chunk([{"index": 0, "delta": delta, "finish_reason": finish}])


def _openai_end(finish: str, output_tokens: int) -> list[bytes]:
    usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": output_tokens,
             "total_tokens": PROMPT_TOKENS + output_tokens}
    return [_openai_delta({}, finish), _openai_chunk([], usage=usage), b"data: [DONE]"]


def _openai_frames(tokens: list[str], finish: bool = True) -> list[bytes]:
    frames = [_openai_delta({"role": "assistant", "content": ""})]
    frames += [_openai_delta({"content": t}) for t in tokens]
    return frames + (_openai_end("stop", len(tokens)) if finish else [])


def _anthropic_event(name: str, **data: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps({"type": name, **data})


_ANTHROPIC_START = _anthropic_event(
    "message_start", message={"id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "m",
                              "stop_reason": None, "usage": {"input_tokens": PROMPT_TOKENS, "output_tokens": 1}})


def _anthropic_end(stop_reason: str, output_tokens: int) -> list[bytes]:
    return [_anthropic_event("message_delta", delta={"stop_reason": stop_reason, "stop_sequence": None},
                             usage={"output_tokens": output_tokens}),
            _anthropic_event("message_stop")]


def _anthropic_text(tokens: list[str], index: int = 0) -> list[bytes]:
    """A text block at ``index``, without its stop."""
    return [_anthropic_event("content_block_start", index=index, content_block={"type": "text", "text": ""}),
            *(_anthropic_event("content_block_delta", index=index, delta={"type": "text_delta", "text": t})
              for t in tokens)]


def _anthropic_frames(tokens: list[str], finish: bool = True) -> list[bytes]:
    frames = [_ANTHROPIC_START, *_anthropic_text(tokens)]
    if finish:
        frames += [_anthropic_event("content_block_stop", index=0), *_anthropic_end("end_turn", len(tokens))]
    return frames


def _gemini_frames(tokens: list[str], finish: bool = True) -> list[bytes]:
    frames = []
    for n, token in enumerate(tokens, 1):
        candidate: dict[str, Any] = {"content": {"parts": [{"text": token}], "role": "model"}, "index": 0}
        if finish and n == len(tokens):
            candidate["finishReason"] = "STOP"
        frames.append(b"data: " + orjson.dumps({
            "candidates": [candidate], "modelVersion": "gemini-test",
            "usageMetadata": {"promptTokenCount": PROMPT_TOKENS, "candidatesTokenCount": n,
                              "totalTokenCount": PROMPT_TOKENS + n}}))
    return frames


# The ``tools`` scenario: a little text, then two tool calls (the first one's arguments in two pieces).
TOOL_TEXT = "Checking."
TOOL_CALLS = [("call_1", "get_weather", {"city": "Paris"}), ("call_2", "get_time", {"zone": "CET"})]


SLOW_CALL = ("call_slow", "write_note")


def slow_call_pieces(count: int) -> list[str]:
    """The arguments of ``slow-tools``' call, in ``count`` pieces and a closing one."""
    return ['{"text": "', *(f"t{n} " for n in range(count - 2)), '"}']


def _openai_slow_tool_frames(pieces: list[str]) -> list[bytes]:
    call_id, name = SLOW_CALL
    first = _openai_delta({"tool_calls": [{"index": 0, "id": call_id, "type": "function",
                                           "function": {"name": name, "arguments": ""}}]})
    return [_openai_delta({"role": "assistant", "content": ""}), first,
            *(_openai_delta({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}) for p in pieces),
            *_openai_end("tool_calls", len(pieces))]


def _anthropic_slow_tool_frames(pieces: list[str]) -> list[bytes]:
    call_id, name = SLOW_CALL
    return [_ANTHROPIC_START,
            _anthropic_event("content_block_start", index=0,
                             content_block={"type": "tool_use", "id": call_id, "name": name, "input": {}}),
            *(_anthropic_event("content_block_delta", index=0, delta={"type": "input_json_delta", "partial_json": p})
              for p in pieces),
            _anthropic_event("content_block_stop", index=0), *_anthropic_end("tool_use", len(pieces))]


BROKEN_ARGUMENTS = '{"city": "Par'


def _openai_broken_tool_frames() -> list[bytes]:
    call = {"index": 0, "id": "call_b", "type": "function", "function": {"name": "get_weather",
                                                                          "arguments": BROKEN_ARGUMENTS}}
    return [_openai_delta({"role": "assistant", "content": ""}), _openai_delta({"tool_calls": [call]}),
            *_openai_end("tool_calls", 3)]


SLOW_TOOL_FRAMES = {"openai": _openai_slow_tool_frames, "anthropic": _anthropic_slow_tool_frames}


def _openai_tool_frames() -> list[bytes]:
    def call(index: int, **fields: Any) -> bytes:
        return _openai_delta({"tool_calls": [{"index": index, **fields}]})

    return [
        _openai_delta({"role": "assistant", "content": ""}), _openai_delta({"content": TOOL_TEXT}),
        call(0, id="call_1", type="function", function={"name": "get_weather", "arguments": ""}),
        call(0, function={"arguments": '{"city": '}), call(0, function={"arguments": '"Paris"}'}),
        call(1, id="call_2", type="function", function={"name": "get_time", "arguments": '{"zone": "CET"}'}),
        *_openai_end("tool_calls", 9),
    ]


def _anthropic_tool_frames() -> list[bytes]:
    def tool(index: int, call_id: str, name: str, pieces: list[str]) -> list[bytes]:
        return [_anthropic_event("content_block_start", index=index,
                                 content_block={"type": "tool_use", "id": call_id, "name": name, "input": {}}),
                *(_anthropic_event("content_block_delta", index=index,
                                   delta={"type": "input_json_delta", "partial_json": p}) for p in pieces),
                _anthropic_event("content_block_stop", index=index)]

    return [
        _ANTHROPIC_START, *_anthropic_text([TOOL_TEXT]), _anthropic_event("content_block_stop", index=0),
        *tool(1, "call_1", "get_weather", ['{"city": ', '"Paris"}']),
        *tool(2, "call_2", "get_time", ['{"zone": "CET"}']),
        *_anthropic_end("tool_use", 9),
    ]


def _gemini_tool_frames() -> list[bytes]:
    usage = {"promptTokenCount": PROMPT_TOKENS, "candidatesTokenCount": 9, "totalTokenCount": PROMPT_TOKENS + 9}
    calls = [{"functionCall": {"id": call_id, "name": name, "args": args}} for call_id, name, args in TOOL_CALLS]
    return [
        b"data: " + orjson.dumps({"candidates": [{"content": {"parts": [{"text": TOOL_TEXT}], "role": "model"},
                                                  "index": 0}], "usageMetadata": usage}),
        b"data: " + orjson.dumps({"candidates": [{"content": {"parts": calls, "role": "model"}, "index": 0,
                                                  "finishReason": "STOP"}], "usageMetadata": usage}),
    ]


TOOL_FRAMES: dict[str, Callable[[], list[bytes]]] = {
    "openai": _openai_tool_frames, "anthropic": _anthropic_tool_frames, "gemini": _gemini_tool_frames,
}

# The reasoning scenarios: the reasoning in pieces, its signature (base64, as Anthropic's and Gemini's are),
# Anthropic's redacted block, the reasoning tokens reported, and the one call of ``reasoning-tools``.
REASONING = ["Let me ", "think."]
REASONING_TEXT = "".join(REASONING)
SIGNATURE = base64.b64encode(b"signature-1").decode()
REDACTED = base64.b64encode(b"encrypted thinking").decode()
REASONING_TOKENS = 7
REASONING_CALL = ("call_r1", "get_weather", {"city": "Paris"})


def _openai_reasoning_frames(field: str, call: bool = False) -> list[bytes]:
    """Reasoning as ``delta.<field>`` (with ``content`` null), then the text or one tool call."""
    frames = [_openai_delta({"role": "assistant", "content": None, field: ""})]
    frames += [_openai_delta({"content": None, field: t}) for t in REASONING]
    if call:
        call_id, name, args = REASONING_CALL
        frames.append(_openai_delta({"tool_calls": [{"index": 0, "id": call_id, "type": "function", "function": {
            "name": name, "arguments": orjson.dumps(args).decode()}}]}))
    else:
        frames += [_openai_delta({"content": t, field: None}) for t in TOKENS]
    output = (1 if call else len(TOKENS)) + REASONING_TOKENS
    usage = openai.types.CompletionUsage(
        prompt_tokens=PROMPT_TOKENS, completion_tokens=output, total_tokens=PROMPT_TOKENS + output,
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=REASONING_TOKENS))
    finish = "tool_calls" if call else "stop"
    return [*frames, _openai_delta({}, finish), _openai_chunk([], usage=usage.model_dump(exclude_none=True)),
            b"data: [DONE]"]


def _anthropic_thinking(index: int) -> list[bytes]:
    """A signed thinking block at ``index``, stop included, each event as the SDK's types have it."""
    def delta(value: Any) -> bytes:
        return _anthropic_event("content_block_delta", index=index, delta=value.model_dump())

    block = anthropic.types.ThinkingBlock(type="thinking", thinking="", signature="")
    return [_anthropic_event("content_block_start", index=index, content_block=block.model_dump()),
            *(delta(anthropic.types.ThinkingDelta(type="thinking_delta", thinking=t)) for t in REASONING),
            delta(anthropic.types.SignatureDelta(type="signature_delta", signature=SIGNATURE)),
            _anthropic_event("content_block_stop", index=index)]


def _anthropic_reasoning_frames() -> list[bytes]:
    redacted = anthropic.types.RedactedThinkingBlock(type="redacted_thinking", data=REDACTED)
    return [_ANTHROPIC_START, *_anthropic_thinking(0),
            _anthropic_event("content_block_start", index=1, content_block=redacted.model_dump()),
            _anthropic_event("content_block_stop", index=1),
            *_anthropic_text(TOKENS, index=2), _anthropic_event("content_block_stop", index=2),
            *_anthropic_end("end_turn", len(TOKENS) + REASONING_TOKENS)]


def _anthropic_reasoning_tool_frames() -> list[bytes]:
    call_id, name, args = REASONING_CALL
    return [_ANTHROPIC_START, *_anthropic_thinking(0),
            _anthropic_event("content_block_start", index=1,
                             content_block={"type": "tool_use", "id": call_id, "name": name, "input": {}}),
            _anthropic_event("content_block_delta", index=1,
                             delta={"type": "input_json_delta", "partial_json": orjson.dumps(args).decode()}),
            _anthropic_event("content_block_stop", index=1), *_anthropic_end("tool_use", 1 + REASONING_TOKENS)]


def _gemini_chunk(parts: list[types.Part], output: int, finish: bool = False) -> bytes:
    """A ``GenerateContentResponse`` frame of a thinking model, its parts and usage from the SDK's types."""
    candidate: dict[str, Any] = {"content": {"parts": [_wire(p) for p in parts], "role": "model"}, "index": 0}
    if finish:
        candidate["finishReason"] = "STOP"
    usage = types.GenerateContentResponseUsageMetadata(
        prompt_token_count=PROMPT_TOKENS, candidates_token_count=output, thoughts_token_count=REASONING_TOKENS,
        total_token_count=PROMPT_TOKENS + output + REASONING_TOKENS)
    return b"data: " + orjson.dumps({"candidates": [candidate], "usageMetadata": _wire(usage)})


def _gemini_reasoning_frames(call: bool = False) -> list[bytes]:
    """Thought parts, then the text with the signature on a last empty part, or one call carrying it."""
    signature = base64.b64decode(SIGNATURE)
    frames = [_gemini_chunk([types.Part(text=t, thought=True)], 0) for t in REASONING]
    if call:
        call_id, name, args = REASONING_CALL
        part = types.Part(function_call=types.FunctionCall(id=call_id, name=name, args=args),
                          thought_signature=signature)
        return [*frames, _gemini_chunk([part], 1, finish=True)]
    frames += [_gemini_chunk([types.Part(text=t)], n) for n, t in enumerate(TOKENS, 1)]
    return [*frames, _gemini_chunk([types.Part(text="", thought_signature=signature)], len(TOKENS), finish=True)]


def _wire(model: Any) -> Any:
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


REASONING_FRAMES: dict[str, dict[str, Callable[[], list[bytes]]]] = {
    "reasoning": {"openai": lambda: _openai_reasoning_frames("reasoning_content"),
                  "anthropic": _anthropic_reasoning_frames, "gemini": _gemini_reasoning_frames},
    "reasoning-alt": {"openai": lambda: _openai_reasoning_frames("reasoning"),
                      "anthropic": _anthropic_reasoning_frames, "gemini": _gemini_reasoning_frames},
    "reasoning-tools": {"openai": lambda: _openai_reasoning_frames("reasoning_content", call=True),
                        "anthropic": _anthropic_reasoning_tool_frames,
                        "gemini": lambda: _gemini_reasoning_frames(call=True)},
}
FRAMES: dict[str, Callable[..., list[bytes]]] = {
    "openai": _openai_frames, "anthropic": _anthropic_frames, "gemini": _gemini_frames,
}
ERROR_FRAMES = {
    "openai": b'data: {"error": {"message": "boom", "type": "server_error"}}',
    "anthropic": b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}',
    "gemini": b'data: {"error": {"code": 500, "message": "boom", "status": "INTERNAL"}}',
}
# Not SSE (a line of control bytes and invalid UTF-8), then an event whose data is not JSON (named as
# Anthropic's text delta, so its adapter does not skip it as an event it ignores).
GARBAGE = b"\x00\xff\x13garbage{{{\n\nevent: content_block_delta\ndata: {not json\n\n"
# Well-formed SSE and JSON, but not the object any vendor sends.
WRONG_SHAPE = b"event: content_block_delta\ndata: [1, 2]\n\n"
HTML = b"<html><head><title>502 Bad Gateway</title></head>\n<body><h1>Bad Gateway</h1></body></html>\n"
# The tail of a fault scenario: ``None`` cuts the connection, ``b""`` goes silent, other bytes are sent
# before the body ends normally.
FAULT_TAILS: dict[str, bytes | None] = {"drop": None, "stall": b"", "garbage": GARBAGE, "shape": WRONG_SHAPE,
                                        "html": HTML}
PINGS = {"openai": b": keep-alive", "anthropic": b'event: ping\ndata: {"type": "ping"}', "gemini": b": ping"}
ERROR_BODIES = {
    "openai": lambda status: {"error": {"message": "Incorrect API key provided: sk-te***cret", "type": "error",
                                        "code": str(status)}},
    "anthropic": lambda status: {"type": "error", "error": {"type": "overloaded_error" if status == 529
                                                            else "api_error", "message": "no"}},
    "gemini": lambda status: {"error": {"code": status, "message": "no", "status": "UNAVAILABLE"}},
}


Turn = tuple[str, str, list[tuple[str, str]]]
# Kept alive: the iterators they hand back check each item as it is read, with the adapter's definitions.
OPENAI_MESSAGE: TypeAdapter[Any] = TypeAdapter(openai.types.chat.ChatCompletionMessageParam)
ANTHROPIC_MESSAGE: TypeAdapter[Any] = TypeAdapter(anthropic.types.MessageParam)


REASONING_BLOCKS = ("thinking", "redacted_thinking")


def conversation(vendor: str, body: dict[str, Any]) -> list[Turn]:
    """A recorded request's messages (the system prompt left out) as ``(role, text, attachments)``, each
    attachment ``(kind, url)``: ``image`` or ``pdf``, and its link or data URL; reasoning sent back is left
    out (``assistant_parts`` reads it). Every message is read through the vendor SDK's own request type
    first, so a body the vendor would not take fails here."""
    if vendor == "openai":
        return [_openai_turn(m) for m in body["messages"] if m["role"] != "system"]
    if vendor == "anthropic":
        return [_anthropic_turn(m) for m in body["messages"]]
    return [_gemini_turn(types.Content.model_validate(c)) for c in body["contents"]]


def _openai_turn(message: dict[str, Any]) -> Turn:
    checked = OPENAI_MESSAGE.validate_python(message)
    if isinstance(message["content"], str):
        return message["role"], message["content"], []
    list(checked["content"])  # an iterable's parts are checked as they are read
    parts = message["content"]
    files = [("image", p["image_url"]["url"]) if p["type"] == "image_url" else ("pdf", p["file"]["file_data"])
             for p in parts if p["type"] != "text"]
    return message["role"], "".join(p["text"] for p in parts if p["type"] == "text"), files


def _anthropic_turn(message: dict[str, Any]) -> Turn:
    checked = ANTHROPIC_MESSAGE.validate_python(message)
    if isinstance(message["content"], str):
        return message["role"], message["content"], []
    list(checked["content"])
    blocks, files = message["content"], []
    for block in blocks:
        if block["type"] not in ("text", *REASONING_BLOCKS):
            source = block["source"]
            url = source.get("url") or f"data:{source['media_type']};base64,{source['data']}"
            files.append(("image" if block["type"] == "image" else "pdf", url))
    return message["role"], "".join(b["text"] for b in blocks if b["type"] == "text"), files


def _gemini_turn(content: types.Content) -> Turn:
    text, files = "", []
    for part in content.parts or ():
        if part.thought:
            continue
        if part.text is not None:
            text += part.text
        elif part.file_data is not None:
            files.append((part.file_data.mime_type, part.file_data.file_uri or ""))
        elif part.inline_data is not None:
            data = base64.b64encode(part.inline_data.data or b"").decode()
            files.append((part.inline_data.mime_type, f"data:{part.inline_data.mime_type};base64,{data}"))
    kinds = [("pdf" if mime == "application/pdf" else "image", url) for mime, url in files]
    return "assistant" if content.role == "model" else "user", text, kinds


OPENAI_TOOL: TypeAdapter[Any] = TypeAdapter(openai.types.chat.ChatCompletionToolParam)
OPENAI_TOOL_CHOICE: TypeAdapter[Any] = TypeAdapter(openai.types.chat.ChatCompletionToolChoiceOptionParam)
ANTHROPIC_TOOL: TypeAdapter[Any] = TypeAdapter(anthropic.types.ToolParam)
ANTHROPIC_TOOL_CHOICE: TypeAdapter[Any] = TypeAdapter(anthropic.types.ToolChoiceParam)


ANTHROPIC_OUTPUT: TypeAdapter[Any] = TypeAdapter(anthropic.types.OutputConfigParam)
OPENAI_FORMAT: TypeAdapter[Any] = TypeAdapter(openai.types.chat.completion_create_params.ResponseFormat)


def json_format(vendor: str, body: dict[str, Any]) -> tuple[str, Any] | None:
    """The JSON a request asks the answer to be, the same for every vendor: ``("json_object", None)`` or
    ``("json_schema", schema)``; read through the vendor SDK's own types."""
    if vendor == "openai":
        if "response_format" not in body:
            return None
        fmt = OPENAI_FORMAT.validate_python(body["response_format"])
        return (fmt["type"], fmt.get("json_schema", {}).get("schema"))
    if vendor == "anthropic":
        if "output_config" not in body:
            return None
        return "json_schema", ANTHROPIC_OUTPUT.validate_python(body["output_config"])["format"]["schema"]
    config = types.GenerationConfig.model_validate(body.get("generationConfig", {}))
    if config.response_mime_type != "application/json":
        return None
    return ("json_schema", config.response_json_schema) if config.response_json_schema else ("json_object", None)


@dataclass
class ToolExchange:
    """What a request says about tools, the same for every vendor: the tools' names and parameters, the
    choice (``auto``, ``none``, ``required`` or the forced tool's name), the calls in its history as
    ``(id, name, arguments)`` and the results as ``(id, result)``."""

    tools: list[tuple[str, dict[str, Any]]]
    choice: str | None
    calls: list[tuple[str, str, Any]]
    results: list[tuple[str, Any]]


def tool_exchange(vendor: str, body: dict[str, Any]) -> ToolExchange:
    """Read through the vendor SDK's own request types, as ``conversation`` does."""
    if vendor == "openai":
        return _openai_exchange(body)
    if vendor == "anthropic":
        return _anthropic_exchange(body)
    return _gemini_exchange(body)


def _openai_exchange(body: dict[str, Any]) -> ToolExchange:
    for message in body["messages"]:
        OPENAI_MESSAGE.validate_python(message)
    tools = [OPENAI_TOOL.validate_python(t)["function"] for t in body.get("tools", [])]
    choice = OPENAI_TOOL_CHOICE.validate_python(body["tool_choice"]) if "tool_choice" in body else None
    return ToolExchange(
        [(t["name"], t["parameters"]) for t in tools],
        choice["function"]["name"] if isinstance(choice, dict) else choice,
        [(c["id"], c["function"]["name"], orjson.loads(c["function"]["arguments"]))
         for m in body["messages"] for c in m.get("tool_calls", [])],
        [(m["tool_call_id"], orjson.loads(m["content"])) for m in body["messages"] if m["role"] == "tool"])


def _anthropic_exchange(body: dict[str, Any]) -> ToolExchange:
    for message in body["messages"]:
        list(ANTHROPIC_MESSAGE.validate_python(message)["content"])
    tools = [ANTHROPIC_TOOL.validate_python(t) for t in body.get("tools", [])]
    choice = ANTHROPIC_TOOL_CHOICE.validate_python(body["tool_choice"]) if "tool_choice" in body else None
    blocks = [b for m in body["messages"] if isinstance(m["content"], list) for b in m["content"]]
    named = {"any": "required"}
    return ToolExchange(
        [(t["name"], t["input_schema"]) for t in tools],
        None if choice is None else choice.get("name") or named.get(choice["type"], choice["type"]),
        [(b["id"], b["name"], b["input"]) for b in blocks if b["type"] == "tool_use"],
        [(b["tool_use_id"], orjson.loads(b["content"])) for b in blocks if b["type"] == "tool_result"])


def _gemini_exchange(body: dict[str, Any]) -> ToolExchange:
    parts = [p for c in body["contents"] for p in types.Content.model_validate(c).parts or ()]
    declarations = [d for t in body.get("tools", []) for d in types.Tool.model_validate(t).function_declarations or ()]
    config = types.ToolConfig.model_validate(body["toolConfig"]).function_calling_config if "toolConfig" in body else None
    choice = None
    if config is not None:
        named = {"AUTO": "auto", "NONE": "none", "ANY": "required"}
        choice = (config.allowed_function_names or [None])[0] or named[str(config.mode.value if config.mode else "")]
    return ToolExchange(
        [(d.name or "", d.parameters_json_schema) for d in declarations], choice,
        [(p.function_call.id or "", p.function_call.name or "", p.function_call.args)
         for p in parts if p.function_call is not None],
        [(p.function_response.id or "", p.function_response.response) for p in parts if p.function_response is not None])


@dataclass(frozen=True)
class SentPart:
    """A part of an assistant turn as a request gave it back, the same for every vendor: ``kind`` is
    ``reasoning`` (``text`` the reasoning), ``redacted`` (``text`` the data), ``text`` or ``tool-call``
    (``text`` the call's id); ``signature`` is the vendor's signature sent on that part."""

    kind: str
    text: str
    signature: str | None = None


def assistant_parts(vendor: str, body: dict[str, Any]) -> list[list[SentPart]]:
    """The parts of each assistant turn of a recorded request, in the order they were sent, read through
    the vendor SDK's own request types as ``conversation`` does."""
    if vendor == "openai":
        return [_openai_parts(m) for m in body["messages"] if m["role"] == "assistant"]
    if vendor == "anthropic":
        return [_anthropic_parts(m) for m in body["messages"] if m["role"] == "assistant"]
    contents = [types.Content.model_validate(c) for c in body["contents"]]
    return [[_gemini_part(p) for p in c.parts or ()] for c in contents if c.role == "model"]


def _openai_parts(message: dict[str, Any]) -> list[SentPart]:
    OPENAI_MESSAGE.validate_python(message)
    assert set(message) <= {"role", "content", "tool_calls"}, f"not a Chat Completions field: {set(message)}"
    text = [SentPart("text", message["content"])] if message.get("content") else []
    return text + [SentPart("tool-call", c["id"]) for c in message.get("tool_calls", [])]


def _anthropic_parts(message: dict[str, Any]) -> list[SentPart]:
    checked = ANTHROPIC_MESSAGE.validate_python(message)
    if isinstance(message["content"], str):
        return [SentPart("text", message["content"])]
    blocks = list(checked["content"])  # each block checked as it is read: ThinkingBlockParam and the rest
    named = {"thinking": "reasoning", "redacted_thinking": "redacted", "text": "text", "tool_use": "tool-call"}
    field = {"thinking": "thinking", "redacted_thinking": "data", "text": "text", "tool_use": "id"}
    return [SentPart(named[b["type"]], b[field[b["type"]]], b.get("signature")) for b in blocks]


def _gemini_part(part: types.Part) -> SentPart:
    signature = base64.b64encode(part.thought_signature).decode() if part.thought_signature else None
    if part.function_call is not None:
        return SentPart("tool-call", part.function_call.id or "", signature)
    return SentPart("reasoning" if part.thought else "text", part.text or "", signature)


THINKING: TypeAdapter[Any] = TypeAdapter(anthropic.types.ThinkingConfigParam)


def anthropic_refusal(body: dict[str, Any]) -> str | None:
    """Why Anthropic would refuse a request's extended thinking with a 400, or None: the budget's range, the
    sampling and tool choice it takes, and, in a tool loop, the last assistant turn's thinking given back."""
    if "thinking" not in body:
        return None
    thinking = THINKING.validate_python(body["thinking"])
    if thinking["type"] != "enabled":
        return None
    if not 1024 <= thinking["budget_tokens"] < body["max_tokens"]:
        return "thinking.budget_tokens must be at least 1024 and less than max_tokens"
    if body.get("temperature", 1) != 1 or body.get("top_p", 1) < 0.95:
        return "temperature may only be 1, and top_p at least 0.95, with thinking enabled"
    if body.get("tool_choice", {}).get("type") in ("any", "tool"):
        return "Thinking may not be enabled when tool_choice forces tool use."
    assistant = [m for m in body["messages"] if m["role"] == "assistant"]
    last = assistant[-1]["content"] if assistant else ""
    if isinstance(last, list) and any(b["type"] == "tool_use" for b in last) and last[0]["type"] not in REASONING_BLOCKS:
        return "Expected `thinking` or `redacted_thinking`, but found `tool_use`."
    return None


@dataclass
class VendorServer:
    """One vendor's fake. ``requests`` keeps each request's path, headers, body and client address."""

    vendor: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    closed: dict[str, float] = field(default_factory=dict)
    closed_events: dict[str, asyncio.Event] = field(default_factory=dict)

    def closed_event(self, marker: str) -> asyncio.Event:
        return self.closed_events.setdefault(marker, asyncio.Event())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            message = await receive()
            await send({"type": "lifespan.startup.complete"})
            message = await receive()
            assert message["type"] == "lifespan.shutdown"
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.requests.append({"path": scope["path"], "headers": headers, "body": orjson.loads(body or b"{}"),
                              "client": tuple(scope["client"])})
        scenario = self._scenario(scope["path"], orjson.loads(body or b"{}"))
        refusal = anthropic_refusal(orjson.loads(body or b"{}")) if self.vendor == "anthropic" else None
        if refusal is not None:
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": orjson.dumps(
                {"type": "error", "error": {"type": "invalid_request_error", "message": refusal}})})
            return
        await self._answer(scenario, receive, send)

    def _scenario(self, path: str, body: dict[str, Any]) -> str:
        if self.vendor == "gemini":  # /v1beta/models/{model}:streamGenerateContent
            return path.rsplit("/", 1)[-1].split(":", 1)[0]
        return str(body.get("model", "normal"))

    async def _answer(self, scenario: str, receive: Receive, send: Send) -> None:
        if scenario.isdigit():
            status = int(scenario)
            headers = [(b"content-type", b"application/json")]
            if status == 429:
                headers.append((b"retry-after", b"7"))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": orjson.dumps(ERROR_BODIES[self.vendor](status))})
            return
        if scenario == "whole":  # the whole answer in one network write, its length stated
            answer = b"".join(chunk for chunk in self._chunks(scenario) if chunk)
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream"), (b"content-length", str(len(answer)).encode())]})
            await send({"type": "http.response.body", "body": answer})
            return
        if scenario == "html":  # a 200 that is a web page, not a stream
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/html; charset=utf-8")]})
            await send({"type": "http.response.body", "body": HTML})
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        if scenario.startswith("slow-"):
            await self._slow(scenario.removeprefix("slow-"), receive, send)
            return
        for chunk in self._chunks(scenario):
            if chunk is None:  # "drop", "drop-first": cut the connection without ending the body
                raise ConnectionAbortedError("dropped on purpose")
            if chunk == b"":  # "stall", "stall-first": go silent until the client gives up
                await self._until_disconnect(receive)
                return
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if scenario == "split-utf8":
                await asyncio.sleep(0.005)  # separate network writes, so the client reads them apart
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _chunks(self, scenario: str) -> list[bytes | None]:
        make = FRAMES[self.vendor]
        sep = b"\r\n" if scenario == "crlf" or self.vendor == "gemini" else b"\n"
        if scenario in REASONING_FRAMES:
            frames = REASONING_FRAMES[scenario][self.vendor]()
        else:
            frames = TOOL_FRAMES[self.vendor]() if scenario == "tools" else make(TOKENS)
        if scenario == "tools-broken":
            frames = _openai_broken_tool_frames()
        if scenario == "pings":
            frames = [f for frame in frames for f in (PINGS[self.vendor], frame)]
        fault, _, position = scenario.rpartition("-")
        if scenario in ("drop", "stall"):
            fault, position = scenario, "mid"
        if scenario in ("error-frame", "drop", "stall") or position == "mid":
            frames = make(TOKENS[:2], finish=False)
        elif position == "first":
            frames = []
        stream = [frame.replace(b"\n", sep) + sep + sep for frame in frames]
        if scenario == "error-frame":
            stream.append(ERROR_FRAMES[self.vendor].replace(b"\n", sep) + sep + sep)
        if scenario == "split-utf8":
            joined = b"".join(stream)
            cut = joined.index("\u00f6".encode()) + 1  # inside the two bytes of "ö"
            cut2 = joined.index("\U0001f600".encode()) + 2  # inside the four bytes of the emoji
            return [joined[:cut], joined[cut:cut2], joined[cut2:]]
        tail = [FAULT_TAILS[fault]] if fault in FAULT_TAILS and position in ("first", "mid") else []
        return [*stream, *tail]

    async def _slow(self, marker: str, receive: Receive, send: Send) -> None:
        tokens = [f"t{n} " for n in range(SLOW_TOKENS)]
        if marker.startswith("tools-"):
            frames = SLOW_TOOL_FRAMES[self.vendor](slow_call_pieces(SLOW_TOKENS))
        else:
            frames = FRAMES[self.vendor](tokens)
        sep = b"\r\n" if self.vendor == "gemini" else b"\n"
        watcher = asyncio.create_task(self._until_disconnect(receive))
        try:
            for frame in frames:
                if watcher.done():
                    break
                await send({"type": "http.response.body", "body": frame.replace(b"\n", sep) + sep + sep,
                            "more_body": True})
                await asyncio.sleep(SLOW_GAP_S)
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                watcher.cancel()
                return
        except OSError:
            pass
        await watcher
        self.closed[marker] = time.monotonic()
        self.closed_event(marker).set()

    async def _until_disconnect(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass


class ScriptedProvider:
    """A provider of the tests' own, in-process (no wire format): a subclass names itself and its models and
    scripts ``stream``; it takes every model name and attachment as given."""

    name = "scripted"
    models: tuple[str, ...] = ("model",)
    has_credentials = True
    response_formats: frozenset[str] = frozenset()

    def check_model(self, model: str) -> None:
        pass

    def accepts(self, attachment: object) -> bool:
        return True

    async def aclose(self) -> None:
        pass
