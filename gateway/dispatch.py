"""Calling a provider for a caller: the quota admission, the way to the first token, and its failures."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Awaitable
from dataclasses import replace
from typing import Any

from gateway.errors import GatewayError, StreamAlreadyActive, UpstreamError, UpstreamTimeout
from gateway.quotas import Admission
from gateway.services import Services
from gateway.sse import EventStream
from gateway.turns import StreamCodec, Turn, estimate_tokens
from providers.base import ProviderError, ProviderRequest, ProviderTimeout, UnknownModel
from storage.chats import Owner


def upstream_failure(error: ProviderError) -> GatewayError:
    failure = (UpstreamTimeout if error.http_status == 504 else UpstreamError)(error.message)
    failure.code = error.code
    if error.retry_after is not None:
        failure.headers["Retry-After"] = str(math.ceil(error.retry_after))
    return failure


async def admit(services: Services, owner: Owner, stream_id: uuid.UUID, request: ProviderRequest) -> Admission:
    """Reserve the turn's estimated tokens: the prompt's estimate plus its ``max_tokens`` (or the default)."""
    estimate = services.quotas.estimate(estimate_tokens(request.prompt_chars), request.max_tokens)
    return await services.quotas.admit(owner.org_id, owner.user_id, str(stream_id), estimate)


async def start_turn(services: Services, turn: Turn, model: str, storing: Awaitable[None] | None = None) -> None:
    """Register the turn and reach its first token; a failure before it is stored, then raised as the
    JSON error the client gets.

    With ``storing`` (the writes of the turn's messages), the provider is called while they run rather
    than after them, and the turn goes on only once they are done: no token reaches the client before the
    message it answers is stored. If storing fails, the provider call is closed, the turn is dropped
    without a trace (its quota reservation and chat freed) and the failure is raised.
    """
    services.streams.add(turn)
    opening: Awaitable[None] = open_with_fallbacks(services, turn, model)
    if storing is not None:
        opening = asyncio.ensure_future(opening)
        try:
            await storing
        except BaseException:
            opening.cancel()
            await asyncio.gather(opening, return_exceptions=True)
            await turn.close_upstream()
            await services.streams.abandon(turn)
            raise
    try:
        await opening
    except ProviderError as error:
        await turn.finish(error=error)
        raise upstream_failure(error) from None
    except asyncio.CancelledError:
        await turn.finish(ending="interrupted", shielded=True)
        raise


async def open_with_fallbacks(services: Services, turn: Turn, model: str) -> None:
    """Reach the first token: retry a retryable failure with backoff, then try the model's fallbacks.

    Nothing has been sent to the client yet, so a retry is invisible to it; after the first token a
    failure is final. The model that answered is the one recorded on the reply.
    """
    settings = services.settings
    error: ProviderError | None = None
    for candidate in [model, *settings.fallbacks.get(model, [])]:
        try:
            provider, model_name = services.providers.resolve(candidate)
        except UnknownModel:
            continue
        request = replace(turn.request, model=model_name)
        for attempt in range(settings.retries + 1):
            if error is not None:
                await turn.switch_upstream(candidate, provider.stream(request))
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


async def admit_and_claim(
    services: Services, owner: Owner, chat_id: uuid.UUID, message_id: uuid.UUID, request: ProviderRequest
) -> Admission:
    """The quota admission and the chat's stream lease, asked for at once (their Redis round trips overlap).
    When either is refused or fails, the other is undone; the admission's refusal is the one reported."""
    admitting = asyncio.ensure_future(admit(services, owner, message_id, request))
    claiming = asyncio.ensure_future(services.streams.claim(chat_id, message_id))
    try:
        admission, claimed = await asyncio.gather(admitting, claiming)
        if not claimed:
            raise StreamAlreadyActive()
    except BaseException as error:
        await asyncio.wait([admitting, claiming])
        if succeeded(admitting):
            await services.quotas.settle(admitting.result().ticket, 0)
        if succeeded(claiming) and claiming.result():
            await services.streams.release(chat_id, message_id)
        refusal = admitting.exception() if admitting.done() and not admitting.cancelled() else None
        if refusal is not None and not isinstance(error, asyncio.CancelledError):
            raise refusal from None
        raise
    return admission


def succeeded(task: asyncio.Future[Any]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


def event_stream(services: Services, turn: Turn, codec: StreamCodec, headers: dict[str, str]) -> EventStream:
    """The turn as an SSE response: pings when quiet, a stuck send bounded in time, a hang-up ends the turn."""
    settings = services.settings
    return EventStream(turn, codec, headers, settings.ping_s, settings.send_timeout_s)
