"""Calling a provider for a caller: the quota admission, the way to the first token, and its failures."""

from __future__ import annotations

import asyncio
import functools
import math
import uuid
from collections.abc import Awaitable
from dataclasses import replace

from gateway.edge.errors import GatewayError, ModelNotFound, UpstreamError, UpstreamTimeout, ValidationFailed
from gateway.streaming.admission import Admission
from gateway.streaming.registry import StreamRegistry
from gateway.streaming.sse import ChatEvents, EventStream
from gateway.streaming.turns import StreamCodec, Turn, estimate_tokens, internal_failure
from providers.base import (
    InvalidModelOptions,
    Provider,
    ProviderError,
    ProviderRequest,
    ProviderStream,
    ProviderTimeout,
    UnknownModel,
    failed,
)
from storage.chats import Owner
from storage.tapes import CHAT, UI


def upstream_failure(error: ProviderError) -> GatewayError:
    failure = (UpstreamTimeout if error.http_status == 504 else UpstreamError)(error.message)
    failure.code = error.code
    if error.retry_after is not None:
        failure.headers["Retry-After"] = str(math.ceil(error.retry_after))
    return failure


def call_provider(provider: Provider, request: ProviderRequest) -> ProviderStream:
    """The provider's stream for ``request``. One the adapter fails to even build fails at its first read
    instead, so that every failure takes the turn's one way to its end (its reservation settled)."""
    try:
        return provider.stream(request)
    except Exception as error:
        return failed(internal_failure(error, f"{provider.name}/{request.model}"))


def resolve_model(streams: StreamRegistry, model: str) -> tuple[Provider, str]:
    """The model's provider: 404 ``model_not_found`` for a name none serves, 422 for options it refuses."""
    try:
        return streams.providers.resolve(model)
    except UnknownModel as error:
        raise ModelNotFound(str(error)) from None
    except InvalidModelOptions as error:
        raise ValidationFailed(
            str(error), details=[{"loc": ["model"], "msg": str(error), "type": "invalid"}]
        ) from None


def token_estimate(streams: StreamRegistry, prompt_chars: int, max_tokens: int | None) -> int:
    """What a turn reserves: its prompt's estimate plus its ``max_tokens`` (or the default)."""
    return streams.quotas.estimate(estimate_tokens(prompt_chars), max_tokens)


async def admit(
    streams: StreamRegistry, owner: Owner, stream_id: uuid.UUID, estimate: int, chat_id: uuid.UUID | None = None
) -> Admission:
    """Reserve the turn's ``estimate`` of tokens. A chat turn also takes its chat's lease in the same
    round trip (409 while another stream holds it)."""
    lease = None if chat_id is None else streams.lease(owner.org_id, chat_id, stream_id)
    return await streams.quotas.admit(owner.org_id, owner.user_id, str(stream_id), estimate, lease)


async def start_turn(streams: StreamRegistry, turn: Turn, model: str, storing: Awaitable[None] | None = None) -> None:
    """Register the turn and reach its first token; a failure before it is stored, then raised as the
    JSON error the client gets.

    With ``storing`` (the writes of the turn's messages), the provider is called while they run rather
    than after them, and the turn goes on only once they are done: no token reaches the client before the
    message it answers is stored. If storing fails, the provider call is closed, the turn is dropped
    without a trace (its quota reservation and chat freed) and the failure is raised.
    """
    if turn.ticket is not None and turn.request.max_tokens is None:
        # No output cap of its own: the reservation grows as the answer streams (finding: a reply with
        # no max_tokens could run far past the default it reserved).
        turn.watch_output(streams.quotas.default_max_tokens, functools.partial(streams.quotas.extend, turn.ticket))
    streams.add(turn)
    opening: Awaitable[None] = open_with_fallbacks(streams, turn, model)
    if storing is not None:
        opening = asyncio.ensure_future(opening)
        try:
            await storing
        except BaseException:
            opening.cancel()
            await asyncio.gather(opening, return_exceptions=True)
            await turn.close_upstream()
            await streams.abandon(turn)
            raise
    try:
        await opening
    except asyncio.CancelledError:
        await turn.finish(ending="interrupted", shielded=True)
        raise
    except Exception as error:
        failure = error if isinstance(error, ProviderError) else internal_failure(error, turn.model)
        await turn.finish(error=failure)
        raise upstream_failure(failure) from None


async def open_with_fallbacks(streams: StreamRegistry, turn: Turn, model: str) -> None:
    """Reach the first token: retry a retryable failure with backoff, then try the model's fallbacks.

    Nothing has been sent to the client yet, so a retry is invisible to it; after the first token a
    failure is final. The model that answered is the one recorded on the reply.
    """
    settings = streams.settings
    error: ProviderError | None = None
    for candidate in [model, *settings.fallbacks.get(model, [])]:
        try:
            provider, model_name = streams.providers.resolve(candidate)
        except (UnknownModel, InvalidModelOptions):
            continue
        request = replace(turn.request, model=model_name)
        for attempt in range(settings.retries + 1):
            if error is not None:
                await turn.switch_upstream(candidate, call_provider(provider, request))
            try:
                async with asyncio.timeout(settings.first_token_timeout_s):
                    await turn.open()
                return
            except TimeoutError:
                error = ProviderTimeout("No first token before the timeout")
            except ProviderError as failure:
                error = failure
            if turn.stopped or not error.retryable:
                break
            if attempt < settings.retries:
                wait = error.retry_after if error.retry_after is not None else settings.retry_backoff_s * 2**attempt
                await asyncio.sleep(min(wait, settings.max_retry_wait_s))
        if turn.stopped:
            return
    assert error is not None
    raise error


def event_stream(
    streams: StreamRegistry, turn: Turn, codec: StreamCodec, headers: dict[str, str],
    owner: Owner | None = None, on_disconnect: str | None = None,
) -> EventStream:
    """The turn as an SSE response: pings when quiet, a stuck send bounded in time. A chat turn's frames
    (one with its ``owner``) are kept for resumers when resuming is on; the sender hanging up ends the turn,
    or with ``on_disconnect`` ``continue`` (the deployment's default when None) leaves it running unread."""
    settings = streams.settings
    tape = None
    if streams.tapes is not None and turn.ids is not None and owner is not None:
        tape = streams.tapes.tape(turn.ids.chat_id, turn.ids.assistant_message_id, owner,
                                  CHAT if type(codec) is ChatEvents else UI)
    detach_s = settings.detached_max_s if (on_disconnect or settings.on_disconnect) == "continue" else None
    return EventStream(turn, codec, headers, settings.ping_s, settings.send_timeout_s, tape, detach_s)
