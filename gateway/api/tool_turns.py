"""The agent side of a chat turn: stored replies and tool results as a provider's messages, the results a
send posts back checked against the calls that wait for them, and the tools and effort a turn runs with.

A reply's parts (``reasoning``, ``text``, ``tool-call``, in stream order) become one assistant message:
its calls, and its reasoning only for the provider that produced it (a signature is good nowhere else).
A ``tool`` message's ``tool-result`` parts become one provider message each. A call without its result in
the window (a reply stopped mid-call, or a user who sent a message instead of results) is left out, and so
is a result whose call fell out of the window: every vendor refuses either.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, cast

import orjson

from gateway.api.schemas import (
    NamedToolChoice,
    ReasoningEffort,
    ToolChoice,
    ToolResult,
    ToolSpec,
    choice_refusal,
)
from gateway.edge.errors import GatewayError, ValidationFailed
from providers.base import ChatMessage, Reasoning, Tool, ToolCall
from storage.messages import HistoryMessage, TurnContext


class NoPendingToolCalls(GatewayError):
    code, status, message = "no_pending_tool_calls", 409, "No tool calls in this chat wait for results"


def provider_of(model: str | None) -> str:
    return (model or "").partition("/")[0]


def reply_messages(message: HistoryMessage, provider: str) -> list[ChatMessage]:
    """A stored reply or tool message as the provider's messages (see the module's docstring)."""
    if message.role == "tool":
        return result_messages(message)
    parts = message.parts or []
    calls = tuple(ToolCall(p["tool_call_id"], p["tool_name"], call_arguments(p))
                  for p in parts if p.get("type") == "tool-call")
    reasoning: tuple[Reasoning, ...] = ()
    if provider_of(message.model) == provider:
        reasoning = tuple(Reasoning(p.get("text", ""), p.get("signature"), p.get("redacted"))
                          for p in parts if p.get("type") == "reasoning")
    return [ChatMessage("assistant", message.content, tool_calls=calls, reasoning=reasoning)]


def call_arguments(part: dict[str, Any]) -> str:
    """A stored call's input as JSON arguments; a call whose arguments were not JSON goes back as ``{}``."""
    return "{}" if "input_error" in part else orjson.dumps(part.get("input", {})).decode()


def result_messages(message: HistoryMessage) -> list[ChatMessage]:
    """One ``tool`` message per result; the message's text, if any, after them as the user's."""
    results = [ChatMessage("tool", result_text(p), tool_call_id=p["tool_call_id"])
               for p in message.parts or () if p.get("type") == "tool-result"]
    return [*results, ChatMessage("user", message.content)] if message.content else results


def result_text(part: dict[str, Any]) -> str:
    """A result's output as the text a vendor takes: a string as is, other JSON as JSON; an error's
    wrapped as ``{"error": ...}``."""
    output = part.get("output")
    if part.get("is_error"):
        output = {"error": output}
    return output if isinstance(output, str) else orjson.dumps(output).decode()


def answered(messages: list[ChatMessage]) -> list[ChatMessage]:
    """The conversation without calls that have no result and results that have no call."""
    results = {m.tool_call_id for m in messages if m.role == "tool"}
    calls = {c.id for m in messages for c in m.tool_calls}
    kept: list[ChatMessage] = []
    for message in messages:
        if message.role == "tool":
            if message.tool_call_id in calls:
                kept.append(message)
        elif message.tool_calls and not all(c.id in results for c in message.tool_calls):
            whole = tuple(c for c in message.tool_calls if c.id in results)
            if whole or message.content:
                kept.append(replace(message, tool_calls=whole))
        else:
            kept.append(message)
    return kept


def pending_calls(history: list[HistoryMessage]) -> list[str]:
    """The ids of the calls the chat's last reply made, which wait for results (none when a message came
    after it)."""
    if not history or history[-1].role != "assistant":
        return []
    return [p["tool_call_id"] for p in history[-1].parts or () if p.get("type") == "tool-call"]


def check_results(results: list[ToolResult], pending: list[str]) -> None:
    """409 when no call waits; 422 (``loc`` to the entry) for a result naming no waiting call or one
    answered twice, and for a waiting call left without its result."""
    if not pending:
        raise NoPendingToolCalls()
    seen: set[str] = set()
    for index, result in enumerate(results):
        if result.tool_call_id not in pending or result.tool_call_id in seen:
            why = "answers this call twice" if result.tool_call_id in seen else "names no call waiting for a result"
            raise ValidationFailed(details=[{"loc": ["tool_results", index, "tool_call_id"], "msg": why,
                                             "type": "unknown_tool_call"}])
        seen.add(result.tool_call_id)
    if missing := [call_id for call_id in pending if call_id not in seen]:
        raise ValidationFailed(details=[{"loc": ["tool_results"], "type": "missing_tool_result",
                                         "msg": f"has no result for the calls {', '.join(missing)}"}])


def result_parts(results: list[ToolResult]) -> list[dict[str, Any]]:
    return [{"type": "tool-result", "tool_call_id": r.tool_call_id, "output": r.output, "is_error": r.is_error}
            for r in results]


def result_chars(results: list[ToolResult] | None) -> int:
    return sum(len(result_text(part)) for part in result_parts(results or []))


def stored_tool(tool: dict[str, Any]) -> Tool:
    """A chat's default tool, as it was checked when the chat stored it."""
    function = tool["function"]
    return Tool(function["name"], function.get("description"), function.get("parameters", EMPTY_PARAMETERS))


EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class TurnTools:
    """The tools, choice and effort a turn runs with: the send's, else its chat's defaults."""

    def __init__(self, tools: list[ToolSpec] | None, choice: ToolChoice | None, effort: ReasoningEffort | None,
                 context: TurnContext) -> None:
        if tools is not None:
            self.tools = tuple(tool.for_model() for tool in tools)
        else:
            self.tools = tuple(stored_tool(tool) for tool in context.tools or ())
        if choice is None and context.tool_choice is not None:
            stored = context.tool_choice
            choice = NamedToolChoice.model_validate(stored) if isinstance(stored, dict) else cast(ToolChoice, stored)
        choice_refusal(choice, {tool.name for tool in self.tools}, [])
        self.forced = choice.function.name if isinstance(choice, NamedToolChoice) else None
        self.choice: Any = "required" if self.forced else choice if self.tools else None
        self.effort: Any = effort or context.reasoning_effort

    @property
    def for_request(self) -> dict[str, Any]:
        """The ProviderRequest fields."""
        return {"tools": self.tools, "tool_choice": self.choice, "forced_tool": self.forced,
                "reasoning_effort": self.effort}
