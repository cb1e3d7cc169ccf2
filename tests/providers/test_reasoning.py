"""Reasoning at the provider layer: each adapter against its vendor's fake (the real adapter, the vendor's
wire format), and the fake provider's ``think`` model."""

from __future__ import annotations

import base64
from typing import Any

import anthropic.types
import orjson
import pytest
from google.genai import types
from pydantic import TypeAdapter

from providers.base import (
    REASONING_BUDGETS,
    ChatMessage,
    Finish,
    ProviderRequest,
    ProviderStatusError,
    Reasoning,
    ReasoningDelta,
    ReasoningEffort,
    StreamEvent,
    ToolCall,
    ToolCallDelta,
    UpstreamConfig,
    Usage,
)
from providers.fake import FAKE_SIGNATURE, FakeProvider
from providers.openai import OpenAIProvider
from tests.providers.test_adapters import WEATHER, adapter_for, all_events, assembled, text_of
from tests.vendors import (
    OUTPUT_TOKENS,
    PROMPT_TOKENS,
    REASONING,
    REASONING_CALL,
    REASONING_TEXT,
    REASONING_TOKENS,
    REDACTED,
    SIGNATURE,
    TEXT,
    TOKENS,
    VENDORS,
    SentPart,
    assistant_parts,
)

THOUGHTS: list[StreamEvent] = [ReasoningDelta(t) for t in REASONING]
# The ``reasoning`` scenario as each adapter streams it: the reasoning first, in order, then the text.
STREAMED: dict[str, list[StreamEvent]] = {
    "openai": [*THOUGHTS, *TOKENS, Usage(PROMPT_TOKENS, OUTPUT_TOKENS + REASONING_TOKENS, REASONING_TOKENS),
               Finish("stop")],
    # The block's signature after its text, then a redacted block; no separate count of thinking tokens.
    "anthropic": [*THOUGHTS, ReasoningDelta("", SIGNATURE), ReasoningDelta("", redacted=REDACTED), *TOKENS,
                  Usage(PROMPT_TOKENS, OUTPUT_TOKENS + REASONING_TOKENS), Finish("stop")],
    # The signature came on the last (empty) text part: right after the text.
    "gemini": [*THOUGHTS, *TOKENS, ReasoningDelta("", SIGNATURE),
               Usage(PROMPT_TOKENS, OUTPUT_TOKENS + REASONING_TOKENS, REASONING_TOKENS), Finish("stop")],
}
EFFORTS: list[ReasoningEffort] = ["minimal", "low", "medium", "high"]
ANTHROPIC_THINKING: TypeAdapter[Any] = TypeAdapter(anthropic.types.ThinkingConfigParam)


def asking(model: str, *messages: ChatMessage, **fields: Any) -> ProviderRequest:
    return ProviderRequest(model, list(messages) or [ChatMessage("user", "hi")], **fields)


def reasoning_of(events: list[StreamEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, ReasoningDelta))


def pieces(events: list[StreamEvent]) -> tuple[Reasoning, ...]:
    """A stream's reasoning as a turn keeps it for history, by ReasoningDelta's rule: consecutive deltas
    make a piece, which a signature, a text delta or a tool call ends; redacted data is a piece of its own."""
    kept: list[Reasoning] = []
    open_text: list[str] | None = None
    for event in events:
        if isinstance(event, ReasoningDelta) and event.redacted is None:
            open_text = [*(open_text or []), event.text]
            if event.signature is not None:
                kept.append(Reasoning("".join(open_text), event.signature))
                open_text = None
            continue
        if open_text is not None and isinstance(event, (str, ToolCallDelta, ReasoningDelta)):
            kept.append(Reasoning("".join(open_text)))
            open_text = None
        if isinstance(event, ReasoningDelta):
            kept.append(Reasoning("", redacted=event.redacted))
    return (*kept, Reasoning("".join(open_text))) if open_text is not None else tuple(kept)


@pytest.mark.parametrize("vendor", VENDORS)
async def test_reasoning_streams_in_order_before_the_text(vendors: dict[str, Any], vendor: str) -> None:
    events = await all_events(adapter_for(vendor, vendors[vendor][1]), asking("reasoning", reasoning_effort="low"))
    assert events == STREAMED[vendor]
    assert reasoning_of(events) == REASONING_TEXT and text_of(events) == TEXT


async def test_delta_reasoning_of_compatible_servers_is_read_too(vendors: dict[str, Any]) -> None:
    # vLLM 0.19.1+, Ollama and OpenRouter send ``delta.reasoning``; a compatible server needs no key.
    config = UpstreamConfig(connect_timeout_s=2, idle_timeout_s=0.5)
    local = OpenAIProvider("local", None, f"{vendors['openai'][1]}/v1", config, vendor="vLLM", models=())
    events = await all_events(local, asking("reasoning-alt", reasoning_effort="high"))
    assert events == STREAMED["openai"]
    assert vendors["openai"][0].requests[-1]["body"]["reasoning_effort"] == "high"


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize("effort", [*EFFORTS, None])
async def test_the_effort_reaches_the_vendor_in_its_own_form(
    vendors: dict[str, Any], vendor: str, effort: ReasoningEffort | None
) -> None:
    server, url = vendors[vendor]
    events = await all_events(adapter_for(vendor, url), asking("reasoning", reasoning_effort=effort))
    assert events == STREAMED[vendor]  # the fake took the request (Anthropic's checks the budget)
    body = server.requests[-1]["body"]
    if vendor == "openai":
        assert body.get("reasoning_effort") == effort
    elif vendor == "anthropic":
        thinking = ANTHROPIC_THINKING.validate_python(body["thinking"]) if "thinking" in body else None
        assert thinking == (effort and {"type": "enabled", "budget_tokens": REASONING_BUDGETS[effort]})
    else:
        config = types.GenerationConfig.model_validate(body.get("generationConfig", {}))
        assert config.thinking_config == (effort and types.ThinkingConfig(
            thinking_budget=REASONING_BUDGETS[effort], include_thoughts=True))


@pytest.mark.parametrize(("max_tokens", "top_p", "sent_max_tokens", "sent_top_p"), [
    (50, 0.5, 50 + REASONING_BUDGETS["high"], None),  # the budget must fit below max_tokens, with the answer
    (32_000, 0.97, 32_000, 0.97),  # room enough; a top_p of 0.95 or more is taken with thinking
])
async def test_anthropic_thinking_fits_in_max_tokens_without_a_temperature(
    vendors: dict[str, Any], max_tokens: int, top_p: float, sent_max_tokens: int, sent_top_p: float | None
) -> None:
    server, url = vendors["anthropic"]
    request = asking("reasoning", max_tokens=max_tokens, temperature=0.2, top_p=top_p, reasoning_effort="high")
    assert await all_events(adapter_for("anthropic", url), request) == STREAMED["anthropic"]
    body = server.requests[-1]["body"]
    assert (body["max_tokens"], body.get("top_p"), "temperature" in body) == (sent_max_tokens, sent_top_p, False)


async def test_anthropic_thinking_is_left_off_when_a_tool_call_is_required(vendors: dict[str, Any]) -> None:
    # Anthropic refuses thinking with a forced tool: the required call wins over the effort.
    server, url = vendors["anthropic"]
    request = asking("normal", tools=(WEATHER,), tool_choice="required", reasoning_effort="high", temperature=0.2)
    assert text_of(await all_events(adapter_for("anthropic", url), request)) == TEXT
    body = server.requests[-1]["body"]
    assert "thinking" not in body and body["temperature"] == 0.2


# What a tool loop's first step keeps of its reasoning, and what its second step gives back, in the order
# sent: Anthropic's thinking block, signed, before the tool_use; Gemini's signature on the functionCall part
# it came on; nothing for OpenAI, whose messages have no field for it.
KEPT = {
    "openai": (Reasoning(REASONING_TEXT),),
    "anthropic": (Reasoning(REASONING_TEXT, SIGNATURE),),
    "gemini": (Reasoning(REASONING_TEXT), Reasoning("", SIGNATURE)),
}
GIVEN_BACK = {
    "openai": [SentPart("tool-call", REASONING_CALL[0])],
    "anthropic": [SentPart("reasoning", REASONING_TEXT, SIGNATURE), SentPart("tool-call", REASONING_CALL[0])],
    "gemini": [SentPart("reasoning", REASONING_TEXT), SentPart("tool-call", REASONING_CALL[0], SIGNATURE)],
}


@pytest.mark.parametrize("vendor", VENDORS)
async def test_a_tool_loop_gives_the_reasoning_back_in_the_vendors_form(vendors: dict[str, Any], vendor: str) -> None:
    server, url = vendors[vendor]
    question = ChatMessage("user", "weather in Paris?")
    first = await all_events(adapter_for(vendor, url),
                             asking("reasoning-tools", question, tools=(WEATHER,), reasoning_effort="medium"))
    assert reasoning_of(first) == REASONING_TEXT and assembled(first) == [REASONING_CALL]
    assert first[-1] == Finish("tool_calls") and pieces(first) == KEPT[vendor]
    calls = tuple(ToolCall(call_id, name, orjson.dumps(args).decode()) for call_id, name, args in assembled(first))
    turn = ChatMessage("assistant", "", tool_calls=calls, reasoning=pieces(first))
    result = ChatMessage("tool", '{"celsius": 18}', tool_call_id=calls[0].id)
    second = await all_events(adapter_for(vendor, url),
                              asking("reasoning", question, turn, result, tools=(WEATHER,), reasoning_effort="medium"))
    assert second == STREAMED[vendor]  # Anthropic's fake refuses a thinking tool turn without its thinking
    assert assistant_parts(vendor, server.requests[-1]["body"]) == [GIVEN_BACK[vendor]]


async def test_anthropic_refuses_a_thinking_tool_turn_whose_thinking_is_not_given_back(
    vendors: dict[str, Any],
) -> None:
    # What the loop above guards against: the fake, like Anthropic, answers 400.
    turn = ChatMessage("assistant", "", tool_calls=(ToolCall("call_r1", "get_weather", '{"city": "Paris"}'),))
    request = asking("reasoning", ChatMessage("user", "weather?"), turn,
                     ChatMessage("tool", "{}", tool_call_id="call_r1"), reasoning_effort="low")
    with pytest.raises(ProviderStatusError) as failure:
        await all_events(adapter_for("anthropic", vendors["anthropic"][1]), request)
    assert failure.value.status == 400


async def test_anthropic_history_keeps_redacted_thinking_and_leaves_out_unsigned(vendors: dict[str, Any]) -> None:
    server, url = vendors["anthropic"]
    turn = ChatMessage("assistant", "an answer", reasoning=(
        Reasoning("first", "c2lnLWE="), Reasoning("", redacted=REDACTED), Reasoning("from elsewhere")))
    request = asking("normal", ChatMessage("user", "q"), turn, ChatMessage("user", "and?"))
    assert text_of(await all_events(adapter_for("anthropic", url), request)) == TEXT
    assert assistant_parts("anthropic", server.requests[-1]["body"]) == [[
        SentPart("reasoning", "first", "c2lnLWE="), SentPart("redacted", REDACTED), SentPart("text", "an answer")]]


async def test_gemini_signatures_go_back_on_the_parts_they_came_on(vendors: dict[str, Any]) -> None:
    # A thought's own signature stays on its thought part; one that came on an answer with no calls goes
    # on its last text part.
    server, url = vendors["gemini"]
    other = base64.b64encode(b"signature-2").decode()
    turn = ChatMessage("assistant", "an answer", reasoning=(Reasoning("a thought", SIGNATURE), Reasoning("", other)))
    request = asking("normal", ChatMessage("user", "q"), turn, ChatMessage("user", "and?"))
    assert text_of(await all_events(adapter_for("gemini", url), request)) == TEXT
    assert assistant_parts("gemini", server.requests[-1]["body"]) == [[
        SentPart("reasoning", "a thought", SIGNATURE), SentPart("text", "an answer", other)]]


def test_prompt_chars_count_the_reasoning_sent_back() -> None:
    turn = ChatMessage("assistant", "ok", reasoning=(Reasoning("x" * 40, "sig"),))
    plain = asking("m", ChatMessage("user", "hi"), ChatMessage("assistant", "ok"))
    assert asking("m", ChatMessage("user", "hi"), turn).prompt_chars == plain.prompt_chars + 40


async def batches_of(provider: FakeProvider, request: ProviderRequest) -> list[list[StreamEvent]]:
    return [batch async for batch in provider.stream(request)]


THINKING_ABOUT = ["Thinking ", "about: ", "hi ", "there"]


async def test_fake_think_streams_its_reasoning_before_the_answer() -> None:
    request = asking("think", ChatMessage("user", "hi there"))
    events = [e for batch in await batches_of(FakeProvider(), request) for e in batch]
    reasoning = [ReasoningDelta(w) for w in THINKING_ABOUT[:-1]] + [ReasoningDelta("there", FAKE_SIGNATURE)]
    usage = Usage(max(1, request.prompt_chars // 4), 2 + len(THINKING_ABOUT), len(THINKING_ABOUT))
    assert events == [*reasoning, "hi ", "there", usage, Finish("stop")]
    assert pieces(events) == (Reasoning("Thinking about: hi there", FAKE_SIGNATURE),)


async def test_fake_think_paces_its_reasoning_like_its_answer() -> None:
    batches = await batches_of(FakeProvider(), asking("think?gap_ms=1&usage=0", ChatMessage("user", "hi there")))
    assert [len(batch) for batch in batches] == [1] * (len(THINKING_ABOUT) + 2) + [1]
    assert isinstance(batches[0][0], ReasoningDelta) and batches[-1] == [Finish("stop")]


async def test_fake_think_reasons_before_a_required_tool_call() -> None:
    request = asking("think", ChatMessage("user", "hi there"), tools=(WEATHER,), tool_choice="required")
    events = [e for batch in await batches_of(FakeProvider(), request) for e in batch]
    assert reasoning_of(events) == "Thinking about: hi there"
    assert [type(e) for e in events[len(THINKING_ABOUT):]] == [ToolCallDelta, Usage, Finish]
    assert events[-2:] == [Usage(max(1, request.prompt_chars // 4), 1 + len(THINKING_ABOUT), len(THINKING_ABOUT)),
                           Finish("tool_calls")]


async def test_fake_echo_does_not_reason() -> None:
    request = asking("echo", reasoning_effort="high")
    events = [e for batch in await batches_of(FakeProvider(), request) for e in batch]
    assert events == ["hi", Usage(max(1, request.prompt_chars // 4), 1), Finish("stop")]
