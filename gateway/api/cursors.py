"""The chat listing's cursors: opaque to a client, to the gateway a walk's position and the filters it was for.

A cursor is base64url (unpadded) of a JSON object: ``f`` the filters' fingerprint, ``s`` the walk's snapshot
(PostgreSQL's ``xmin:xmax:xip,...``), ``t`` the time of its first page, ``k`` the sort key of the last chat
listed (both in microseconds since 1970 UTC) and ``i`` that chat's id. Everything in it is checked before use,
so that whatever a client sends is a page or a 422, never a 5xx. Nothing in it is secret: it only ever
selects among the caller's own chats (or its org's shared ones), which the query itself restricts to.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from gateway.edge.errors import ValidationFailed
from storage.chats import ChatFilter, WalkPoint

# How long a walk may last: sql/0011_chat_list.sql keeps the moves that later pages need for two hours.
CURSOR_LIFETIME = timedelta(hours=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
_SNAPSHOT = re.compile(r"([0-9]{1,19}):([0-9]{1,19}):((?:[0-9]{1,19},)*[0-9]{1,19})?")
_MAX_XID = 2**63 - 1
_FIELDS = {"f": str, "s": str, "t": int, "k": int, "i": str}


def fingerprint(match: ChatFilter) -> str:
    """A digest of what a listing holds: a cursor is only good for the filters that made it."""
    return hashlib.sha256(orjson.dumps(match)).hexdigest()[:16]


def write_cursor(point: WalkPoint, match: ChatFilter) -> str:
    fields = {"f": fingerprint(match), "s": point.snapshot, "t": _microseconds(point.started),
              "k": _microseconds(point.key), "i": point.chat_id.hex}
    return base64.urlsafe_b64encode(orjson.dumps(fields)).decode().rstrip("=")


def read_cursor(cursor: str, match: ChatFilter, now: datetime) -> WalkPoint:
    """The walk position ``cursor`` holds; 422 when it is not one the gateway wrote, was written for other
    filters, or is past its lifetime."""
    fields = _cursor_fields(cursor)
    if fields is None or (point := _walk_point(fields)) is None:
        raise _refused("cursor_malformed", "is not a cursor this listing gave (use a page's next_cursor as it is)")
    if fields["f"] != fingerprint(match):
        raise _refused("cursor_filters_differ", "was given by a listing with other filters: send the same ones")
    if now - point.started > CURSOR_LIFETIME:
        raise _refused("cursor_expired", "is more than an hour old: list again from the first page")
    return point


def _cursor_fields(cursor: str) -> dict[str, Any] | None:
    if not _BASE64URL.fullmatch(cursor):
        return None
    try:
        fields = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, orjson.JSONDecodeError):
        return None
    if not isinstance(fields, dict) or fields.keys() != _FIELDS.keys():
        return None
    return fields if all(type(fields[key]) is kind for key, kind in _FIELDS.items()) else None


def _walk_point(fields: dict[str, Any]) -> WalkPoint | None:
    snapshot, started, key = _snapshot(fields["s"]), _instant(fields["t"]), _instant(fields["k"])
    try:
        chat_id = uuid.UUID(hex=fields["i"])
    except ValueError:
        return None
    if snapshot is None or started is None or key is None:
        return None
    return WalkPoint(snapshot, started, key, chat_id)


def _snapshot(text: str) -> str | None:
    """``text`` if PostgreSQL takes it as a pg_snapshot: 0 < xmin <= xmax, in-progress ids ascending within
    [xmin, xmax)."""
    found = _SNAPSHOT.fullmatch(text)
    if found is None:
        return None
    xmin, xmax = int(found[1]), int(found[2])
    running = [int(xid) for xid in found[3].split(",")] if found[3] else []
    ascending = running == sorted(set(running))
    if not (0 < xmin <= xmax <= _MAX_XID and ascending and all(xmin <= xid < xmax for xid in running)):
        return None
    return text


def _instant(microseconds: int) -> datetime | None:
    try:
        return _EPOCH + microseconds * _MICROSECOND
    except OverflowError:
        return None


def _microseconds(moment: datetime) -> int:
    return (moment - _EPOCH) // _MICROSECOND


def _refused(kind: str, message: str) -> ValidationFailed:
    return ValidationFailed(details=[{"loc": ["cursor"], "type": kind, "msg": message}])
