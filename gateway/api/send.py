"""Sending a message: the turn is stored, the provider called, and the reply streamed over SSE.

``run_turn`` tells a turn's start top to bottom: admit it as its chat is read, store the question while
the provider is called, and hand the turn to its response. Its relay and checkpoints (gateway/streaming: sse,
registry), its settling and the answer's store (``StreamRegistry.finish``) follow there.

Past 400 lines because the helpers it calls (the history it sends, the refusals, the turn's rows and their
take-back) are read beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Coroutine, Mapping
from typing import Any

import asyncpg
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.api.chats import new_chat, owner_of
from gateway.api.files import shown_part, turn_files, unread_file_ids
from gateway.api.schemas import (
    MAX_SYSTEM_PROMPT_CHARS,
    ChatTurn,
    SendMessage,
    ToolResult,
    TurnOptions,
    attachment_url_error,
    chat_id_of,
    parse_body,
)
from gateway.api.tool_turns import (
    TurnTools,
    answered,
    check_results,
    pending_calls,
    reply_messages,
    result_chars,
    result_messages,
    result_parts,
)
from gateway.edge.errors import (
    ChatNotFound,
    DuplicateMessage,
    GatewayError,
    NotFound,
    StreamAlreadyActive,
    ValidationFailed,
)
from gateway.edge.metrics import timed
from gateway.edge.responses import JSONBody
from gateway.services import Services, services_of
from gateway.settings import Settings
from gateway.streaming.admission import Admission
from gateway.streaming.dispatch import (
    admit,
    call_provider,
    event_stream,
    resolve_model,
    start_turn,
    token_estimate,
)
from gateway.streaming.sse import ChatEvents
from gateway.streaming.titles import TitleWriter, cut_at_word
from gateway.streaming.turns import StreamCodec, Turn, TurnIds, estimate_tokens
from providers.base import (
    ATTACHMENT_CHARS,
    ATTACHMENT_TYPES,
    Attachment,
    ChatMessage,
    Provider,
    ProviderRequest,
    Role,
    omitted,
)
from storage import chats, messages
from storage.chats import ChatFields, Owner
from storage.db import STORE_FAILURES
from storage.files import FileData, files_for_model
from storage.messages import ChatBefore, HistoryMessage, NewTurn, TurnContext

logger = logging.getLogger("gateway.api.send")

TITLE_CHARS = 80
FileTable = Mapping[uuid.UUID, FileData]  # uploaded files read for a request, by id
NO_FILES: FileTable = {}


def title_from(content: str) -> str:
    """The first message as a title: whitespace folded, at most 80 characters, cut at a word boundary."""
    return cut_at_word(content, TITLE_CHARS)


def past_message(
    role: Role, content: str, parts: list[dict[str, Any]] | None, files: FileTable | None = NO_FILES
) -> ChatMessage:
    """A stored message for the model: its attachments from its parts (one stored before they were
    checked as now, an unsupported type or URL, is named in the text instead); an uploaded file's from
    ``files`` (None: not read yet, a placeholder each; see ``history_messages``)."""
    if not parts:
        return ChatMessage(role, content)
    attachments = []
    for part in parts:
        if part.get("type") == "attachment" and "file_id" in part:
            shown = shown_part(part, files)
            if isinstance(shown, str):
                content += "\n" + shown
            else:
                attachments.append(shown)
        elif part.get("type") == "attachment":
            attachment = Attachment(part["name"], part["media_type"], part["url"])
            if attachment.media_type in ATTACHMENT_TYPES and not attachment_url_error(
                    attachment.media_type, attachment.url):
                attachments.append(attachment)
            else:
                content += "\n" + omitted(attachment)
    return ChatMessage(role, content, tuple(attachments))


def history_window(
    history: list[HistoryMessage], max_chars: int, provider: str, files: FileTable | None = NO_FILES
) -> list[ChatMessage]:
    """The most recent history that fits in ``max_chars`` (an attachment counts ``ATTACHMENT_CHARS``),
    oldest first; replies and tool results as ``reply_messages`` makes them for ``provider``; uploaded
    files from ``files`` (see ``past_message``)."""
    kept: list[ChatMessage] = []
    total = 0
    for stored in reversed(history):
        if stored.role == "user":  # its size without the notes of attachments it names
            converted = [past_message("user", stored.content, stored.parts, files)]
            total += len(stored.content) + len(converted[0].attachments) * ATTACHMENT_CHARS
        else:
            converted = reply_messages(stored, provider)
            total += sum(message_chars(message) for message in converted)
        if total > max_chars:
            break
        kept += reversed(converted)
    kept.reverse()
    return kept


async def history_messages(
    services: Services, owner: Owner, history: list[HistoryMessage], provider: str, file_budget: int
) -> list[ChatMessage]:
    """The history window, its uploaded files read from PostgreSQL: the window is found with a
    placeholder for each file (counted as an attachment), then only its files are read, the most recent
    with their bytes while they fit in ``file_budget`` (the rest, and any deleted, named in the text)."""
    max_chars = services.settings.history_chars
    window = history_window(history, max_chars, provider, None)
    file_ids = unread_file_ids(window)
    if not file_ids:
        return window  # no placeholder in it: as it would be built with the files
    found = await files_for_model(services.pool, owner, file_ids, file_budget)
    return history_window(history, max_chars, provider, found)


def message_chars(message: ChatMessage) -> int:
    return (len(message.content) + len(message.attachments) * ATTACHMENT_CHARS
            + sum(len(c.arguments) for c in message.tool_calls) + sum(len(r.text) for r in message.reasoning))


def refuse_unaccepted(provider: Provider, model: str, options: TurnOptions) -> None:
    """422 when the model's vendor cannot take one of the message's linked attachments as given (an
    uploaded file goes as data, which every vendor takes)."""
    for index, body in enumerate(options.attachments):
        attachment = body.for_model() if body.url is not None else None
        if attachment is not None and not provider.accepts(attachment):
            message = f"{model} cannot take a {attachment.media_type} attachment as a link; send it as a data URL"
            raise ValidationFailed(message, details=[
                {"loc": ["attachments", index, "url"], "msg": message, "type": "unsupported"}])


def checked_content(content: str, limit: int, field: str) -> str:
    if not content.strip():
        raise ValidationFailed(details=[{"loc": [field], "msg": "must not be empty", "type": "empty"}])
    if len(content) > limit:
        raise ValidationFailed(
            details=[{"loc": [field], "msg": f"must be at most {limit} characters", "type": "too_long"}]
        )
    return content


async def send_message(request: Request) -> Response:
    """A message, or (``tool_results``) the results of the calls the chat's last reply made, and the reply."""
    chat_id = chat_id_of(request)
    body = await parse_body(request, SendMessage)
    services = services_of(request)
    content = body.content
    if body.tool_results is None or content:
        content = checked_content(content, services.settings.max_message_chars, "content")
    return await run_turn(request, services, owner_of(request), chat_id, content, body, results=body.tool_results)


async def send_chat(request: Request) -> Response:
    body = await parse_body(request, ChatTurn)
    services = services_of(request)
    content = checked_content(body.message, services.settings.max_message_chars, "message")
    owner = owner_of(request)
    chat_id = body.chat_id
    if chat_id is None:
        if body.model:  # an unknown model is a 404 before its chat is made, not after
            resolve_model(services.streams, body.model)
        fields = ChatFields(body.title, body.model or services.settings.default_model, body.system_prompt)
        chat = await new_chat(services, owner, fields)
        async with taken_back_if_refused(services, owner, chat):
            return await run_turn(request, services, owner, chat["id"], content, body)
    return await run_turn(request, services, owner, chat_id, content, body)


@contextlib.asynccontextmanager
async def taken_back_if_refused(services: Services, owner: Owner, chat: Mapping[str, Any]) -> AsyncIterator[None]:
    """A chat made for its first turn (``chat``, as ``new_chat`` made it) is erased again when the turn is
    refused (a quota, a rate, a file not found, ...): a refusal leaves no empty chat behind. A chat that holds
    a message, or that another request's turn is using, stays."""
    try:
        yield
    except StreamAlreadyActive:  # another request's turn holds the chat
        raise
    except Exception:
        try:
            await chats.erase_empty_chat(services.pool, owner, chat["id"], chat["updated_at"])
        except STORE_FAILURES:
            logger.warning("a refused first turn's chat could not be taken back", exc_info=True,
                           extra={"chat": str(chat["id"])})
        raise


async def stop_stream(request: Request) -> Response:
    chat_id = chat_id_of(request)
    services = services_of(request)
    owner = owner_of(request)
    if await chats.get_chat(services.pool, owner, chat_id) is None:
        raise ChatNotFound()
    if not await services.streams.request_stop(owner.org_id, chat_id):
        error = NotFound("No reply is streaming in this chat")
        error.code = "stream_not_found"
        raise error
    return JSONBody({"stopped": True})


async def run_turn(
    request: Request, services: Services, owner: Owner, chat_id: uuid.UUID, content: str, options: TurnOptions,
    codec: StreamCodec | None = None, headers: dict[str, str] | None = None,
    results: list[ToolResult] | None = None,
) -> Response:
    """Admit the turn, store its message (or, with ``results``, its tool message) while reaching the first
    token, then answer as a stream (``codec``, chat events by default) or, when the client accepts only
    JSON, as one body."""
    settings = services.settings
    ids = TurnIds(chat_id, uuid.uuid4(), uuid.uuid4())
    chosen = resolve_model(services.streams, options.model) if options.model else None
    # The send's files are read before anything is stored: one that is not the caller's is a 404.
    files = await turn_files(services.pool, owner, options.attachments, settings.max_file_bytes)
    options = options.model_copy(update={"attachments": files.stored})
    attachments = files.attachments
    if chosen is not None and attachments:
        refuse_unaccepted(chosen[0], options.model or "", options)
    asked = token_estimate(services.streams, len(content) + len(attachments) * ATTACHMENT_CHARS
                           + result_chars(results), options.max_tokens)
    write = TurnWrite(services, owner, ids, content, options, results)
    context, admission = await read_and_admit(services, owner, ids, asked, options.client_message_id, write)
    try:
        if context.duplicate:
            assert options.client_message_id is not None
            await refuse_duplicate(services, owner, chat_id, options.client_message_id)
        model = options.model or context.model
        provider, model_name = chosen or resolve_model(services.streams, model)
        if attachments and chosen is None:
            refuse_unaccepted(provider, model, options)
        if results is not None:
            check_results(results, pending_calls(context.history))
        tools = TurnTools(options.tools, options.tool_choice, options.reasoning_effort, context)
        new = result_messages(HistoryMessage("tool", content, result_parts(results))) if results is not None \
            else [ChatMessage("user", content + files.text, attachments)]
        provider_request = ProviderRequest(
            model_name, answered([*await history_messages(services, owner, context.history, provider.name,
                                                   settings.max_file_bytes - files.size), *new]),
            system=context.system_prompt, max_tokens=options.max_tokens, temperature=options.temperature,
            **tools.for_request,
        )
        extra = token_estimate(services.streams, provider_request.prompt_chars, options.max_tokens) - asked
        admission = services.quotas.cover(admission, extra)
        turn = Turn(model, provider_request, call_provider(provider, provider_request), services.streams.finish, ids)
    except BaseException:
        await write.undo()
        await withdraw(services, owner, ids, admission)
        raise
    turn.ticket = admission.ticket
    titles = None if context.history else services.titles  # a model titles a chat after its first message
    storing: Awaitable[None] = store_turn(write, model, turn, titles)
    if extra > 0 and turn.ticket is not None:
        storing = alongside(storing, services.quotas.grow(turn.ticket, extra))
    await start_turn(services.streams, turn, model, storing)
    if "application/json" in request.headers.get("accept", ""):
        return await json_answer(services, owner, turn, admission.headers)
    return event_stream(services.streams, turn, codec or ChatEvents(), {**admission.headers, **(headers or {})},
                        owner, options.on_disconnect)


async def read_and_admit(
    services: Services, owner: Owner, ids: TurnIds, estimate: int, client_message_id: str | None,
    write: TurnWrite,
) -> tuple[TurnContext, Admission]:
    """The chat's context (model, system prompt, history, whether it holds ``client_message_id``) and the
    turn's admission for ``estimate`` tokens, both at once. A missing chat wins over a refusal (404), and
    an admission whose turn will not start is withdrawn: neither leaves a trace.

    When the turn names its model, a connection is free for it and no history could exhaust the budgets'
    headroom, its ``write`` starts as soon as it is admitted, while the chat is still being read: the first
    token waits on the write, and this takes the read off its path. A turn refused after all takes the
    write back. Under load the write waits for the read as before: a second connection would be another
    turn's."""
    reading = asyncio.ensure_future(messages.chat_for_turn(
        services.pool, owner, ids.chat_id, services.settings.history_messages, client_message_id,
        ids.user_message_id))
    try:
        admission = await admit(services.streams, owner, ids.assistant_message_id, estimate, ids.chat_id)
    except BaseException:
        if await reading is None:
            raise ChatNotFound() from None
        raise
    try:
        if (write.options.model and write.results is None and services.pool.spare
                and admission.covers(most_history_tokens(services.settings))):
            write.start()
        context = await reading
        if context is None:
            raise ChatNotFound()
    except BaseException:
        await write.undo()
        with contextlib.suppress(GatewayError):  # a refusal has nothing to undo
            await withdraw(services, owner, ids, admission)
        raise
    return context, admission


def most_history_tokens(settings: Settings) -> int:
    """The most a chat's history and system prompt add to a turn's estimate (``extra`` in ``run_turn``),
    their attachments' notes apart: a longer one is refused after the write, and the write taken back."""
    return estimate_tokens(settings.history_chars + MAX_SYSTEM_PROMPT_CHARS)


async def store_turn(write: TurnWrite, model: str, turn: Turn, titles: TitleWriter | None) -> None:
    """The turn's write; then, when it titled an untitled chat with its first message and ``titles`` has a
    model for it, the model's title begun beside the answer."""
    stored, before = await write.done(model)
    if titles is not None and before.title is None and stored.title is not None:
        titles.start(turn, write.owner, write.content, stored.title)


async def alongside(main: Awaitable[None], side: Coroutine[Any, Any, None]) -> None:
    """``main``, with ``side`` run at the same time and finished before this returns."""
    task = asyncio.ensure_future(side)
    try:
        await main
    finally:
        await task


async def withdraw(services: Services, owner: Owner, ids: TurnIds, admission: Admission) -> None:
    lease = services.streams.lease(owner.org_id, ids.chat_id, ids.assistant_message_id)
    await services.quotas.withdraw(admission, lease)


async def refuse_duplicate(services: Services, owner: Owner, chat_id: uuid.UUID, client_message_id: str) -> None:
    """409 when the chat already holds the message a client's id names: a retried send is not stored (or
    answered) twice. The details name the stored message and its reply."""
    found = await messages.client_message(services.pool, owner, chat_id, client_message_id)
    if found is not None:
        user_message_id, assistant_message_id = found
        raise DuplicateMessage(details={"user_message_id": str(user_message_id),
                                        "assistant_message_id": assistant_message_id and str(assistant_message_id)})


class TurnWrite:
    """The turn's two messages (the user's, and the reply's empty start) and the chat's activity time, in
    one statement: started early (``start``), or at ``done``; taken back by ``undo`` when the turn is
    refused after it."""

    def __init__(self, services: Services, owner: Owner, ids: TurnIds, content: str, options: TurnOptions,
                 results: list[ToolResult] | None = None) -> None:
        self.services, self.owner, self.ids, self.content, self.options = services, owner, ids, content, options
        self.results = results  # a tool message's: written only once checked against the calls waiting
        self.task: asyncio.Task[tuple[NewTurn, ChatBefore]] | None = None

    def start(self) -> None:
        """Write now: the turn names its model (``options.model``), known before its chat is read."""
        assert self.options.model is not None
        self.task = asyncio.ensure_future(self._write(self.options.model))

    async def done(self, model: str) -> tuple[NewTurn, ChatBefore]:
        """The write, done (the one ``start`` began, or now): what it stored, and the chat as it was."""
        if self.task is not None:
            return await self.task
        return await self._write(model)

    async def undo(self) -> None:
        """Take back what ``start`` stored: the messages deleted and the chat as it was. Nothing to take
        back when it failed or was never started; when taking back fails, the reply left ``streaming`` is
        ended ``interrupted`` by the sweep of replies no instance streams."""
        if self.task is None:
            return
        task, self.task = self.task, None
        try:
            stored, before = await asyncio.shield(task)
        except Exception:  # nothing stored
            return
        try:
            await messages.unstore_turn(self.services.pool, self.owner, stored, before)
        except STORE_FAILURES:
            logger.warning("a refused turn's messages could not be taken back", exc_info=True,
                           extra={"chat": str(self.ids.chat_id)})

    async def _write(self, model: str) -> tuple[NewTurn, ChatBefore]:
        services, options, ids = self.services, self.options, self.ids
        parts: list[dict[str, Any]] = [{"type": "text", "text": self.content}] if self.content else []
        # An uploaded file's part may be text/plain, which no linked attachment is: no warning for that.
        parts += [{"type": "attachment", **a.model_dump(mode="json", exclude_none=True, warnings=False)}
                  for a in options.attachments]
        parts += result_parts(self.results or [])
        turn = NewTurn(ids.chat_id, ids.user_message_id, ids.assistant_message_id, self.content,
                       title_from(self.content) or None, model, parts, options.client_message_id,
                       options.metadata or {}, "user" if self.results is None else "tool")
        try:
            with timed("postgres", "insert_turn"):
                before = await messages.insert_turn(services.pool, self.owner, turn)
        except asyncpg.UniqueViolationError:  # the same id sent twice at once (the read before saw neither)
            assert options.client_message_id is not None
            await refuse_duplicate(services, self.owner, self.ids.chat_id, options.client_message_id)
            raise DuplicateMessage() from None
        if before is None:
            raise ChatNotFound()
        return turn, before


async def json_answer(services: Services, owner: Owner, turn: Turn, headers: dict[str, str]) -> Response:
    await turn.collect()
    assert turn.ids is not None
    user_message = await messages.get_message(services.pool, owner, turn.ids.user_message_id)
    assistant_message = await messages.get_message(services.pool, owner, turn.ids.assistant_message_id)
    body = {"chat_id": turn.ids.chat_id, "user_message": user_message, "assistant_message": assistant_message}
    if turn.error is not None:
        body["error"] = {"code": turn.error.code, "message": turn.error.message}
    return JSONBody(body, headers=headers)


routes = [
    Route("/v1/chats/{chat_id}/messages", send_message, methods=["POST"]),
    Route("/v1/chat", send_chat, methods=["POST"]),
    Route("/v1/chats/{chat_id}/stop", stop_stream, methods=["POST"]),
]
