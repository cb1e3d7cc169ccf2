"""The file endpoints: upload, list, read, download and delete the caller's files; and a send's files as
a model gets them.

An upload is a ``multipart/form-data`` body (its part named ``file``) or a raw body in the file's own
``Content-Type``. Either is read as it arrives, never past ``GATEWAY_MAX_FILE_BYTES`` (a 413 the moment it
passes) and checked as it comes: the bytes' signature against the declared type (415 on the first bytes),
a text file's UTF-8. The form is parsed here as it streams (``FormReader``), not by Starlette's
``request.form()``: that needs python-multipart, which is not among our dependencies (nor installed), and
Starlette (1.10) writes each file past 1 MiB (``spool_max_size``) to a temporary file, to be read back
whole for PostgreSQL all the same, and checks no limit on a file part (its ``max_part_size`` is for other
fields). Parsed here, a request holds its one file in memory, never past the limit, plus one network read,
and the type is refused on the first bytes, before the rest is read.

A file is its owner's alone: another's is answered like a missing one (404), in a send too.

Past 400 lines because the upload is read here as it streams (``FormReader``), beside the endpoints whose
limits it applies.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import re
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from pydantic import Field, StringConstraints
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from gateway.api.chats import owner_of
from gateway.api.schemas import MAX_OFFSET, Attachment, Query, parse_query, refuse_unstorable
from gateway.edge.errors import GatewayError, PayloadTooLarge, ValidationFailed
from gateway.edge.responses import JSONBody
from gateway.services import services_of
from providers import base as providers
from storage import files
from storage.chats import Owner
from storage.db import Pool
from storage.files import FileData, NewFile, StorageLimitExceeded

TEXT_TYPE = "text/plain"
FILE_TYPES = (*providers.ATTACHMENT_TYPES, TEXT_TYPE)
# The first bytes of each binary type (a WebP is RIFF, a length, then WEBP: checked on its own).
SIGNATURES = {"image/png": (b"\x89PNG\r\n\x1a\n",), "image/jpeg": (b"\xff\xd8\xff",),
              "image/gif": (b"GIF87a", b"GIF89a"), "application/pdf": (b"%PDF-",)}
HEAD_BYTES = 12  # enough of a file to tell its type
NAME_CHARS = 255
# What a form may hold beside its file's bytes: the boundaries and the parts' headers (other fields are
# read and dropped within it too).
FORM_OVERHEAD_BYTES = 64 * 1024
PART_HEADER_BYTES = 8 * 1024
# The URL of a placeholder that stands for a stored file part until its file is read (``shown_part``):
# only ever seen by ``unread_file_ids``, never by a model.
UNREAD_URL = "streamgate-file:"


class FileNotFound(GatewayError):
    code, status, message = "file_not_found", 404, "File not found"


class UnsupportedMediaType(GatewayError):
    code, status, message = "unsupported_media_type", 415, "The file's type is not supported"


class StorageLimitReached(GatewayError):
    code, status, message = "storage_limit_reached", 403, "The limit of stored file bytes is reached"


class UploadAborted(GatewayError):
    """The client went away mid-upload: nobody reads the answer, and nothing was stored."""

    code, status, message = "client_disconnected", 400, "The upload ended before its body did"


class UploadQuery(Query):
    name: Annotated[str, StringConstraints(min_length=1, max_length=NAME_CHARS)] | None = Field(
        default=None, description="The file's name (a form's part may name it instead); by default `file`")


class FileList(Query):
    limit: int = Field(default=20, ge=1, le=100)
    offset: int = Field(default=0, ge=0, le=MAX_OFFSET)
    cursor: Annotated[str, StringConstraints(max_length=200)] | None = Field(
        default=None, description="A page's `next_cursor`: the page after it (offset then counts from there)")


def bare_type(content_type: str) -> str:
    return content_type.partition(";")[0].strip().lower()


def signature_matches(media_type: str, head: bytes) -> bool:
    if media_type == "image/webp":
        return head[:4] == b"RIFF" and head[8:12] == b"WEBP"
    return head.startswith(SIGNATURES[media_type])


def checked_name(name: str, loc: list[str | int]) -> str:
    """A file's name, refused (422 naming ``loc``) when empty, too long, or holding what text cannot hold."""
    refuse_unstorable(name, loc)
    if not 1 <= len(name) <= NAME_CHARS:
        raise ValidationFailed(details=[{"loc": loc, "type": "string_length",
                                         "msg": f"must be 1 to {NAME_CHARS} characters"}])
    return name


class Upload:
    """A file's bytes as they arrive: held (never past ``limit``), hashed, and checked against the type the
    client declared: a binary type's signature once its first bytes are in, a text's UTF-8 as it comes."""

    def __init__(self, name: str, media_type: str, limit: int) -> None:
        if media_type not in FILE_TYPES:
            raise UnsupportedMediaType(f"Files of type {media_type or 'unknown'!r} are not supported; "
                                       f"send one of {', '.join(FILE_TYPES)}")
        self.name, self.media_type, self.limit = name, media_type, limit
        self.data = bytearray()
        self.digest = hashlib.sha256()
        self.text = codecs.getincrementaldecoder("utf-8")() if media_type == TEXT_TYPE else None
        self.checked = media_type == TEXT_TYPE

    def add(self, piece: bytes | bytearray) -> None:
        if len(self.data) + len(piece) > self.limit:
            raise PayloadTooLarge(f"A file holds at most {self.limit} bytes")
        self.data += piece
        self.digest.update(piece)
        if self.text is not None:
            self._check_text(piece, final=False)
        elif not self.checked and len(self.data) >= HEAD_BYTES:
            self._check_signature()

    def finish(self) -> NewFile:
        if not self.data:
            raise ValidationFailed(details=[{"loc": ["file"], "type": "empty", "msg": "the file is empty"}])
        if self.text is not None:
            self._check_text(b"", final=True)
        elif not self.checked:
            self._check_signature()
        return NewFile(self.name, self.media_type, self.data, self.digest.hexdigest())

    def _check_signature(self) -> None:
        if not signature_matches(self.media_type, bytes(self.data[:HEAD_BYTES])):
            raise UnsupportedMediaType(f"The file's bytes are not {self.media_type}")
        self.checked = True

    def _check_text(self, piece: bytes | bytearray, final: bool) -> None:
        assert self.text is not None
        try:
            self.text.decode(piece, final)
        except UnicodeDecodeError:
            raise UnsupportedMediaType("A text/plain file must be UTF-8") from None
        if b"\x00" in piece:
            raise UnsupportedMediaType("A text/plain file must not hold a NUL character")


def declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length", "")
    return int(value) if value.isdigit() else None


async def read_raw(request: Request, upload: Upload) -> Upload:
    """The body as the file's bytes."""
    declared = declared_length(request)
    if declared is not None and declared > upload.limit:
        raise PayloadTooLarge(f"A file holds at most {upload.limit} bytes")
    async for chunk in request.stream():
        upload.add(chunk)
    return upload


def disposition_params(value: str) -> dict[str, str]:
    """A Content-Disposition's parameters (``name``, ``filename``, ``filename*``), quotes taken off."""
    params: dict[str, str] = {}
    for match in re.finditer(r';\s*([^\s=;]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;]*))', value):
        key, quoted, token = match.group(1).lower(), match.group(2), match.group(3)
        params[key] = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else token.strip()
    return params


def part_filename(params: dict[str, str]) -> str | None:
    """The part's file name: RFC 5987's ``filename*`` (UTF-8 only) before a plain ``filename``."""
    extended = params.get("filename*")
    if extended is not None:
        charset, _, rest = extended.partition("'")
        if charset.lower() != "utf-8":
            raise ValidationFailed(details=[{"loc": ["file", "filename"], "type": "charset",
                                             "msg": "filename* must be UTF-8"}])
        try:
            return urllib.parse.unquote(rest.partition("'")[2], errors="strict")
        except UnicodeDecodeError:
            raise ValidationFailed(details=[{"loc": ["file", "filename"], "type": "unicode",
                                             "msg": "filename* must be UTF-8"}]) from None
    return params.get("filename")


def part_headers(block: bytes) -> dict[str, str]:
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationFailed(details=[{"loc": ["file"], "type": "unicode",
                                         "msg": "a part's headers must be UTF-8"}]) from None
    headers = {}
    for line in text.split("\r\n"):
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers


class FormReader:
    """``multipart/form-data`` (RFC 7578) read as it arrives. The bytes of the part named ``file`` go to the
    Upload that ``open_file(filename, content type)`` makes for it; other parts are dropped. It holds one
    network read and the delimiter's length more, and a part's headers (at most ``PART_HEADER_BYTES``)."""

    def __init__(self, boundary: bytes, open_file: Callable[[str | None, str], Upload]) -> None:
        # The first delimiter has no CRLF before it: one is put there, so every delimiter reads alike.
        self.delimiter = b"\r\n--" + boundary
        self.open_file = open_file
        self.buffer = bytearray(b"\r\n")
        self.state = "preamble"  # then "headers", "body", "after" (a delimiter), "end"
        self.upload: Upload | None = None
        self.current: Upload | None = None  # the upload the body being read goes to

    def feed(self, chunk: bytes) -> None:
        if self.state == "end":
            return  # the epilogue: nobody's
        self.buffer += chunk
        while self.state != "end" and self._step():
            pass

    def close(self) -> Upload:
        if self.state != "end":
            raise ValidationFailed("The multipart body ended before its closing boundary")
        if self.upload is None:
            raise ValidationFailed(details=[{"loc": ["file"], "type": "missing",
                                             "msg": "a form part named 'file' is required"}])
        return self.upload

    def _step(self) -> bool:
        """One step of the parse; False when it needs more bytes."""
        if self.state in ("preamble", "body"):
            return self._through_delimiter()
        if self.state == "after":
            return self._after_delimiter()
        return self._headers()

    def _through_delimiter(self) -> bool:
        at = self.buffer.find(self.delimiter)
        if at < 0:
            # Keep what may be the start of a delimiter; the rest is the part's.
            self._emit(len(self.buffer) - len(self.delimiter) + 1)
            return False
        self._emit(at)
        del self.buffer[:len(self.delimiter)]
        self.state, self.current = "after", None
        return True

    def _emit(self, end: int) -> None:
        if end <= 0:
            return
        if self.current is not None:
            self.current.add(self.buffer[:end])
        del self.buffer[:end]

    def _after_delimiter(self) -> bool:
        """``--`` ends the form; else optional whitespace and a CRLF start a part."""
        line_end = self.buffer.find(b"\r\n")
        if self.buffer.startswith(b"--"):
            self.state = "end"
            self.buffer.clear()
            return False
        if line_end < 0:
            if len(self.buffer) > PART_HEADER_BYTES:
                raise ValidationFailed("The multipart body is malformed")
            return False
        if self.buffer[:line_end].strip(b" \t"):
            raise ValidationFailed("The multipart body is malformed")
        del self.buffer[:line_end + 2]
        self.state = "headers"
        return True

    def _headers(self) -> bool:
        if self.buffer.startswith(b"\r\n"):  # a part without headers
            block, taken = b"", 2
        else:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > PART_HEADER_BYTES:
                    raise ValidationFailed(f"A form part's headers hold at most {PART_HEADER_BYTES} bytes")
                return False
            block, taken = bytes(self.buffer[:end]), end + 4
        headers = part_headers(block)
        del self.buffer[:taken]
        params = disposition_params(headers.get("content-disposition", ""))
        if params.get("name") == "file":
            if self.upload is not None:
                raise ValidationFailed(details=[{"loc": ["file"], "type": "too_many",
                                                 "msg": "a form holds one part named 'file'"}])
            # A part without a Content-Type is text (RFC 7578, 4.4).
            self.upload = self.open_file(part_filename(params), bare_type(headers.get("content-type", TEXT_TYPE)))
            self.current = self.upload
        self.state = "body"
        return True


def form_boundary(content_type: str) -> bytes:
    match = re.search(r';\s*boundary\s*=\s*(?:"([^"]{1,70})"|([^\s;"]{1,70}))', content_type, re.IGNORECASE)
    if match is None:
        raise ValidationFailed("A multipart/form-data body needs a boundary (1 to 70 characters)")
    return (match.group(1) or match.group(2)).encode("latin-1")


async def read_form(request: Request, open_file: Callable[[str | None, str], Upload], limit: int) -> Upload:
    """The form's file; the whole body is refused (413) past ``limit`` and the form's overhead."""
    most = limit + FORM_OVERHEAD_BYTES
    declared = declared_length(request)
    if declared is not None and declared > most:
        raise PayloadTooLarge(f"A file holds at most {limit} bytes")
    reader = FormReader(form_boundary(request.headers["content-type"]), open_file)
    read = 0
    async for chunk in request.stream():
        read += len(chunk)
        if read > most:
            raise PayloadTooLarge(f"A file holds at most {limit} bytes")
        reader.feed(chunk)
    return reader.close()


async def received_file(request: Request, name: str | None, limit: int) -> NewFile:
    """The upload in the request, read and checked: a form's ``file`` part, or the raw body."""
    content_type = request.headers.get("content-type", "")

    def open_file(filename: str | None, media_type: str) -> Upload:
        checked = None if filename is None else checked_name(filename, ["file", "filename"])
        return Upload(name or checked or "file", media_type, limit)

    try:
        if bare_type(content_type) == "multipart/form-data":
            upload = await read_form(request, open_file, limit)
        else:
            upload = await read_raw(request, Upload(name or "file", bare_type(content_type), limit))
    except ClientDisconnect:
        raise UploadAborted() from None
    return upload.finish()


async def upload_file(request: Request) -> Response:
    owner = owner_of(request)
    query = parse_query(request, UploadQuery)
    services = services_of(request)
    settings = services.settings
    new = await received_file(request, query.name, settings.max_file_bytes)
    try:
        record = await files.insert_file(services.pool, owner, new, settings.max_file_storage_bytes)
    except StorageLimitExceeded:
        raise StorageLimitReached(f"Your files may hold at most {settings.max_file_storage_bytes} bytes") from None
    return JSONBody(record, status_code=201, headers={"Location": f"/v1/files/{record['id']}"})


def encode_cursor(record: dict[str, Any]) -> str:
    text = f"{record['created_at'].isoformat()}|{record['id']}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        moment, _, file_id = text.partition("|")
        after = datetime.fromisoformat(moment), uuid.UUID(file_id)
    except ValueError:
        raise ValidationFailed(details=[{"loc": ["cursor"], "type": "cursor",
                                         "msg": "is not a cursor this API gave"}]) from None
    if after[0].tzinfo is None:
        raise ValidationFailed(details=[{"loc": ["cursor"], "type": "cursor", "msg": "is not a cursor this API gave"}])
    return after


async def list_files(request: Request) -> Response:
    query = parse_query(request, FileList)
    after = decode_cursor(query.cursor) if query.cursor else None
    items, total = await files.list_files(services_of(request).pool, owner_of(request), limit=query.limit + 1,
                                          offset=query.offset, after=after)
    more = len(items) > query.limit
    del items[query.limit:]
    return JSONBody({"items": items, "total": total, "limit": query.limit, "offset": query.offset,
                     "next_cursor": encode_cursor(items[-1]) if more else None})


def file_id_of(request: Request) -> uuid.UUID:
    """The ``{file_id}`` path parameter; a malformed id names no file: 404 like a missing one."""
    try:
        return uuid.UUID(request.path_params["file_id"])
    except ValueError:
        raise FileNotFound() from None


async def owned_file(request: Request) -> dict[str, Any]:
    record = await files.get_file(services_of(request).pool, owner_of(request), file_id_of(request))
    if record is None:
        raise FileNotFound()
    return record


async def read_file(request: Request) -> Response:
    return JSONBody(await owned_file(request))


def content_disposition(name: str) -> str:
    """``attachment`` with the name twice (RFC 6266): ``filename*`` in UTF-8, percent-encoded, and an ASCII
    ``filename`` for clients that know no other (anything else in it an underscore)."""
    fallback = re.sub(r'[^\x20-\x7e]|["\\%]', "_", name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{urllib.parse.quote(name, safe='')}"


async def file_chunks(pool: Pool, file_id: uuid.UUID, size: int) -> AsyncIterator[bytes]:
    """The file's bytes a chunk at a time, each read when the client has taken the one before. Deleted
    meanwhile, the answer ends short of its Content-Length, which the client sees as a failed download."""
    for seq in range(-(-size // files.CHUNK_BYTES)):
        chunk = await files.file_chunk(pool, file_id, seq)
        if chunk is None:
            return
        yield chunk


async def download_file(request: Request) -> Response:
    record = await owned_file(request)
    headers = {"Content-Length": str(record["size"]), "Content-Disposition": content_disposition(record["name"]),
               "X-Content-Type-Options": "nosniff", "Cache-Control": "private, no-cache"}
    body = file_chunks(services_of(request).pool, record["id"], record["size"])
    return StreamingResponse(body, media_type=record["media_type"], headers=headers)


async def delete_file(request: Request) -> Response:
    if not await files.delete_file(services_of(request).pool, owner_of(request), file_id_of(request)):
        raise FileNotFound()
    return Response(status_code=204)


# A send's files, as a model gets them.


def data_url(file: FileData) -> str:
    assert file.data is not None
    return f"data:{file.media_type};base64,{base64.b64encode(file.data).decode('ascii')}"


def shown_file(file_id: uuid.UUID, name: str, media_type: str, found: Mapping[uuid.UUID, FileData]
               ) -> providers.Attachment | str:
    """A file as the model gets it: an image or a PDF as an attachment carrying its bytes (a data URL); a
    text file as text to add to the message's; one deleted since, or left out to keep the request's files
    within their budget, as the note that names it."""
    file = found.get(file_id)
    if file is None or file.data is None:
        return providers.omitted(providers.Attachment(name, media_type, ""))
    if file.media_type == TEXT_TYPE:
        return f"[attachment {file.name!r} ({TEXT_TYPE})]\n{file.data.decode()}"
    return providers.Attachment(file.name, file.media_type, data_url(file))


def stored_file_ids(parts: list[dict[str, Any]] | None) -> list[uuid.UUID]:
    """The uploaded files a stored message's parts attach."""
    ids = []
    for part in parts or ():
        if part.get("type") == "attachment" and isinstance(part.get("file_id"), str):
            try:
                ids.append(uuid.UUID(part["file_id"]))
            except ValueError:
                continue  # no file has that id: named in the text as one deleted
    return ids


def shown_part(part: dict[str, Any], found: Mapping[uuid.UUID, FileData] | None) -> providers.Attachment | str:
    """A stored message's file part (``{type: attachment, file_id, name, media_type}``) as the model gets it
    (``shown_file``); with ``found`` None, files not read yet, a placeholder for it (``unread_file_ids``)."""
    ids = stored_file_ids([part])
    name, media_type = str(part.get("name", "file")), str(part.get("media_type", ""))
    if not ids:
        return providers.omitted(providers.Attachment(name, media_type, ""))
    if found is None:
        return providers.Attachment(name, media_type, f"{UNREAD_URL}{ids[0]}")
    return shown_file(ids[0], name, media_type, found)


def unread_file_ids(messages: Sequence[providers.ChatMessage]) -> list[uuid.UUID]:
    """The files the placeholders of ``messages`` (oldest first) stand for, the most recent message's first."""
    return [uuid.UUID(a.url.removeprefix(UNREAD_URL)) for message in reversed(messages)
            for a in message.attachments if a.url.startswith(UNREAD_URL)]


@dataclass(frozen=True, slots=True)
class TurnFiles:
    """A send's attachments: as stored (a file's with its name and media type), and as the model gets them
    (text files' text to add to the message's, the others as attachments in order); ``size`` is what the
    turn's files take of the request's budget."""

    stored: list[Attachment]
    text: str
    attachments: tuple[providers.Attachment, ...]
    size: int


async def turn_files(pool: Pool, owner: Owner, attachments: Sequence[Attachment], budget: int) -> TurnFiles:
    """The send's files read, with their bytes: 404 for one the caller has no such file (another's is one
    of those), 413 when they pass ``budget`` bytes together."""
    ids = [a.file_id for a in attachments if a.file_id is not None]
    found = await files.files_for_model(pool, owner, ids, budget)
    stored, text, shown = [], "", []
    for index, attachment in enumerate(attachments):
        if attachment.file_id is None:
            stored.append(attachment)
            shown.append(attachment.for_model())
            continue
        file = found.get(attachment.file_id)
        if file is None:
            raise FileNotFound(details=[{"loc": ["attachments", index, "file_id"], "type": "not_found",
                                         "msg": "no such file"}])
        if file.data is None:
            raise PayloadTooLarge(f"The files of one message hold at most {budget} bytes together")
        # Built, not validated: a client's {file_id} carries nothing else, the stored part its name and type.
        stored.append(Attachment.model_construct(file_id=file.id, name=file.name, media_type=file.media_type))
        model_file = shown_file(file.id, file.name, file.media_type, found)
        if isinstance(model_file, str):
            text += "\n" + model_file
        else:
            shown.append(model_file)
    return TurnFiles(stored, text, tuple(shown), sum(file.size for file in found.values()))


routes = [
    Route("/v1/files", upload_file, methods=["POST"]),
    Route("/v1/files", list_files, methods=["GET"]),
    Route("/v1/files/{file_id}", read_file, methods=["GET"]),
    Route("/v1/files/{file_id}", delete_file, methods=["DELETE"]),
    Route("/v1/files/{file_id}/content", download_file, methods=["GET"]),
]
