"""Logs on stderr: one JSON object a line for machines, or one short text line a record for a person.

``GATEWAY_LOG_FORMAT`` picks: ``json``, ``text``, or ``auto`` (text when stderr is a terminal, JSON otherwise).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Literal, TextIO

import orjson

LogFormat = Literal["auto", "json", "text"]

ACCESS_LOGGER = "gateway.access"  # the middleware's line per request (gateway/edge/middleware.py)
_REQUEST_FIELDS = frozenset({"method", "path", "status", "duration_ms"})
# Attributes every LogRecord has; anything else was passed through ``extra=`` and is logged as a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_TEXT_SKIPPED = {"color_message"}  # uvicorn's copy of its message with terminal colours


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """What the record was given through ``extra=``."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(record_fields(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    """``15:04:05 POST /v1/chat 200 12.3 ms u1/o1 req=0f3a9c1e`` for a request, and
    ``15:04:05 INFO    gateway.cli serving host=127.0.0.1 port=8000`` for any other record."""

    def format(self, record: logging.LogRecord) -> str:
        fields = record_fields(record)
        if record.name == ACCESS_LOGGER and fields.keys() >= _REQUEST_FIELDS:
            body = request_line(fields)
        else:
            body = other_line(record, fields)
        line = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {body}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def request_line(fields: dict[str, Any]) -> str:
    user, org = fields.get("user"), fields.get("org")
    who = f"{user}/{org}" if user else "-"
    request_id = str(fields.get("request_id") or "-")[:8]  # enough to tell lines apart and grep for the rest
    return (f"{fields['method']} {fields['path']} {fields['status']} {float(fields['duration_ms']):.1f} ms "
            f"{who} req={request_id}")


def other_line(record: logging.LogRecord, fields: dict[str, Any]) -> str:
    pairs = "".join(f" {k}={text_value(v)}" for k, v in fields.items() if k not in _TEXT_SKIPPED)
    return f"{record.levelname:<7} {record.name} {record.getMessage()}{pairs}"


def text_value(value: object) -> str:
    """A field's value, quoted when a reader could not tell where it ends."""
    text = str(value)
    if not text or any(c.isspace() or c in "\"'=" for c in text):
        return orjson.dumps(text).decode()
    return text


def chosen_format(setting: LogFormat, stream: TextIO) -> Literal["json", "text"]:
    """The format ``setting`` means for ``stream``: ``auto`` is text on a terminal, JSON anywhere else."""
    if setting != "auto":
        return setting
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time, so a replaced stderr never receives a late line."""

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def configure_logging(level: str, log_format: LogFormat = "auto") -> None:
    """The root logger at ``level``, writing to stderr in ``log_format`` (the first call's format stays)."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    if not any(isinstance(h, StderrHandler) for h in root.handlers):
        handler = StderrHandler()
        text = chosen_format(log_format, sys.stderr) == "text"
        handler.setFormatter(TextFormatter() if text else JsonFormatter())
        root.addHandler(handler)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # The gateway writes its own access line with request id, user and org; the HTTP clients' line per
    # upstream request would double it.
    logging.getLogger("uvicorn.access").disabled = True
    for name in ("httpx", "httpx2", "httpcore", "httpcore2"):
        logging.getLogger(name).setLevel(logging.WARNING)
