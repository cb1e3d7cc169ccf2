"""A chat's title written by a model (``GATEWAY_TITLE_MODEL``) beside the chat's first turn.

The turn that stores a chat's first message also stores that message, cut, as the title of an untitled
chat (gateway/api/send.py). With a title model set, that turn then starts one short call to it, off the
stream's path: the answer is neither delayed nor touched by it. The call is charged like any other: admitted
by the quota guard with a small estimate (no chat lease), settled to its real usage, and written to the
usage ledger with kind ``title``. Its answer, cleaned (``clean_title``), replaces the cut title unless the
chat has been named since (storage/chats.py ``set_model_title``).

The stream waits for it at most ``TITLE_WAIT_S`` once the answer is stored, so that a title ready by then
goes out as ``event: title`` before ``done``; a later one only reaches the chat. Any failure (the vendor's,
a timeout, a quota refusal) leaves the cut title, and is logged: never an error of the turn.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from dataclasses import dataclass

from gateway.edge.errors import GatewayError
from gateway.streaming.admission import Admission, TooManyStreams
from gateway.streaming.dispatch import call_provider
from gateway.streaming.registry import StreamRegistry
from gateway.streaming.turns import Turn, estimate_tokens
from providers.base import (
    ChatMessage,
    InvalidModelOptions,
    Provider,
    ProviderError,
    ProviderRequest,
    UnknownModel,
    Usage,
)
from providers.registry import ProviderRegistry
from storage.chats import Owner, set_model_title
from storage.usage import UsageEntry, record_usage

logger = logging.getLogger("gateway.streaming.titles")

# The longest title a model writes (the cut first message's is 80: gateway/api/send.py).
MODEL_TITLE_CHARS = 60
# The longest wait, after the answer is stored, for a title to send before ``done``.
TITLE_WAIT_S = 2.0
# The longest a title call may take: past it the cut title stays (under a stream slot's lease, 30 s).
TITLE_TIMEOUT_S = 20.0
# Room for a title and a little reasoning; the reservation is the prompt's estimate plus this.
TITLE_MAX_TOKENS = 256
# What of the first message the model sees: its start names the subject, and a long message costs the user.
TITLE_SOURCE_CHARS = 2_000
TITLE_PROMPT = (
    "Write a title for the conversation that starts with the user's message. Answer with the title "
    "alone: at most six words, in the language of the message, with no quotes and no final period."
)
_QUOTES = "\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb"


def cut_at_word(text: str, limit: int) -> str:
    """``text`` with whitespace folded, at most ``limit`` characters, cut at a word boundary (mid-word
    only when its first word alone is longer)."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[: limit + 1].rsplit(" ", 1)[0]
    return (cut if len(cut) <= limit else text[:limit]).rstrip()


def clean_title(answer: str) -> str:
    """A model's answer as a title: whitespace folded, surrounding quotes and a trailing period stripped,
    at most ``MODEL_TITLE_CHARS`` characters cut at a word boundary; empty when nothing is left."""
    text = " ".join(answer.split()).strip(_QUOTES + " ")
    while text.endswith("."):
        text = text.rstrip(".").rstrip(_QUOTES + " ")
    return cut_at_word(text, MODEL_TITLE_CHARS).rstrip(".")


@dataclass(slots=True)
class TitleAnswer:
    """What the title call streamed: its text and the vendor's usage, if it reported one."""

    text: str = ""
    usage: Usage | None = None
    failed: bool = False

    def charge(self, request: ProviderRequest) -> tuple[Usage, bool, int]:
        """Its usage (the vendor's, else the documented estimate, and True), and the tokens charged: none
        for a call that failed before producing anything."""
        usage, estimated = self.usage, False
        if usage is None:
            usage = Usage(estimate_tokens(request.prompt_chars), estimate_tokens(len(self.text)))
            estimated = True
        charged = 0 if self.failed and not self.text else usage.input_tokens + usage.output_tokens
        return usage, estimated, charged


@dataclass(frozen=True, slots=True)
class TitleModel:
    """The model that writes titles: its ``provider/model`` name, its provider and its name there."""

    name: str
    provider: Provider
    model_name: str

    @classmethod
    def resolve(cls, providers: ProviderRegistry, name: str) -> TitleModel:
        """The model ``GATEWAY_TITLE_MODEL`` names; a RuntimeError, before anything is served, if none."""
        try:
            return cls(name, *providers.resolve(name))
        except (UnknownModel, InvalidModelOptions) as error:
            raise RuntimeError(f"GATEWAY_TITLE_MODEL names no model this gateway serves: {error}") from None


class TitleWriter:
    """Writes chat titles with one model; its calls run as tasks of their own, tracked until they end."""

    def __init__(self, model: TitleModel, streams: StreamRegistry) -> None:
        self.model = model
        self.streams = streams
        self.pending: set[asyncio.Task[str | None]] = set()

    def start(self, turn: Turn, owner: Owner, message: str, cut_title: str) -> None:
        """Begin the title of ``turn``'s chat, whose ``message`` (its first) titled it as ``cut_title``;
        the turn's closing frames wait for it (``Turn.title_wait``), at most ``TITLE_WAIT_S``."""
        assert turn.ids is not None
        task = asyncio.ensure_future(self._write(turn, owner, message, cut_title))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)
        turn.title_wait = functools.partial(ready, task, TITLE_WAIT_S)

    async def settled(self) -> None:
        """Until every title call begun so far has ended."""
        while self.pending:
            await asyncio.wait(list(self.pending))

    async def close(self) -> None:
        """Shutting down: the calls still running are given up (their cut titles stay)."""
        tasks = list(self.pending)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _write(self, turn: Turn, owner: Owner, message: str, cut_title: str) -> str | None:
        """The title, once written on the chat; None when it was not (logged)."""
        assert turn.ids is not None
        chat_id = turn.ids.chat_id
        try:
            title = await self._call(turn, owner, chat_id, message)
            if not title:
                logger.warning("the title model answered no title", extra={"chat": str(chat_id)})
                return None
            if not await set_model_title(self.streams.pool, owner, chat_id, cut_title, title):
                return None  # named (or deleted) since: the user's title stays
            return title
        except (GatewayError, ProviderError) as error:  # a quota refusal, the quota store down, the vendor
            logger.warning("a chat's title was not written", extra={
                "chat": str(chat_id), "model": self.model.name, "code": error.code})
        except TimeoutError:
            logger.warning("a chat's title was not written", extra={
                "chat": str(chat_id), "model": self.model.name, "code": "timeout"})
        except Exception:
            logger.exception("a chat's title was not written", extra={"chat": str(chat_id)})
        return None

    async def _call(self, turn: Turn, owner: Owner, chat_id: uuid.UUID, message: str) -> str:
        """Call the model, charged like any call: admitted, then settled and written to the ledger."""
        request = ProviderRequest(self.model.model_name, [ChatMessage("user", message[:TITLE_SOURCE_CHARS])],
                                  system=TITLE_PROMPT, max_tokens=TITLE_MAX_TOKENS)
        admission = await self._admit(turn, owner, request)
        answer = TitleAnswer()
        try:
            async with asyncio.timeout(TITLE_TIMEOUT_S):
                await self._stream(request, answer)
        except BaseException:
            answer.failed = True
            raise
        finally:
            await self._charge(owner, chat_id, admission, request, answer)
        return clean_title(answer.text)

    async def _admit(self, turn: Turn, owner: Owner, request: ProviderRequest) -> Admission:
        """The call's admission. A user at their limit of concurrent streams is admitted once the turn
        beside it has ended, freeing its slot (the closing frames may still catch the title)."""
        quotas = self.streams.quotas
        estimate = quotas.estimate(estimate_tokens(request.prompt_chars), request.max_tokens)
        try:
            return await quotas.admit(owner.org_id, owner.user_id, str(uuid.uuid4()), estimate)
        except TooManyStreams:
            await turn.finished()
            return await quotas.admit(owner.org_id, owner.user_id, str(uuid.uuid4()), estimate)

    async def _stream(self, request: ProviderRequest, answer: TitleAnswer) -> None:
        stream = call_provider(self.model.provider, request)
        try:
            async for batch in stream:
                for event in batch:
                    if type(event) is str:
                        answer.text += event
                    elif isinstance(event, Usage):
                        answer.usage = event
        finally:
            await stream.aclose()

    async def _charge(
        self, owner: Owner, chat_id: uuid.UUID, admission: Admission, request: ProviderRequest,
        answer: TitleAnswer,
    ) -> None:
        usage, estimated, charged = answer.charge(request)
        await self.streams.quotas.settle(admission.ticket, charged)
        if charged:
            await record_usage(self.streams.pool, UsageEntry(
                owner.org_id, owner.user_id, chat_id, None, self.model.name, usage.input_tokens, usage.output_tokens,
                charged, estimated, kind="title"))


async def ready(task: asyncio.Task[str | None], wait_s: float) -> str | None:
    """The task's title if it is written within ``wait_s``; else None, and the task goes on."""
    await asyncio.wait([task], timeout=wait_s)
    if task.done() and not task.cancelled():
        return task.result()
    return None
