"""Log lines: a short text line for a person at a terminal, a JSON object a line for everything else."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import pty
import re
import uuid

import httpx
import orjson

from gateway.edge.logs import ACCESS_LOGGER, JsonFormatter, TextFormatter, chosen_format
from tests.conftest import auth_headers


class Lines(logging.Handler):
    """Keeps each record it is given as the formatter writes it, and wakes whoever waits for one."""

    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self.lines: list[str] = []
        self.added = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))
        self.added.set()

    async def line_holding(self, text: str) -> str:
        async def scan() -> str:
            while True:
                if found := [line for line in self.lines if text in line]:
                    return found[0]
                self.added.clear()
                await self.added.wait()

        return await asyncio.wait_for(scan(), 10)


async def logged_request(gateway_url: str, formatter: logging.Formatter) -> tuple[str, str, str, str]:
    """One authenticated request to the gateway; its access line as ``formatter`` writes it, the request id
    sent, and the user and org."""
    user, org = f"u-{uuid.uuid4().hex[:6]}", f"o-{uuid.uuid4().hex[:6]}"
    request_id = uuid.uuid4().hex
    lines = Lines(formatter)
    access = logging.getLogger(ACCESS_LOGGER)
    access.addHandler(lines)
    try:
        async with httpx.AsyncClient(base_url=gateway_url) as http:
            answer = await http.get("/v1/chats", headers={**auth_headers(user, org), "X-Request-ID": request_id})
        assert answer.status_code == 200
        # The line is written once the response has ended, which may be just after the client has it all.
        line = await lines.line_holding(request_id[:8])
    finally:
        access.removeHandler(lines)
    return line, request_id, user, org


async def test_a_request_is_one_short_text_line(gateway_url: str) -> None:
    line, request_id, user, org = await logged_request(gateway_url, TextFormatter())
    pattern = rf"\d\d:\d\d:\d\d GET /v1/chats 200 \d+\.\d ms {user}/{org} req={request_id[:8]}"
    assert re.fullmatch(pattern, line), line


async def test_a_request_is_one_json_object_with_every_field(gateway_url: str) -> None:
    line, request_id, user, org = await logged_request(gateway_url, JsonFormatter())
    assert "\n" not in line
    entry = orjson.loads(line)
    assert entry["level"] == "info" and entry["logger"] == ACCESS_LOGGER and entry["msg"] == "request"
    assert (entry["method"], entry["path"], entry["status"]) == ("GET", "/v1/chats", 200)
    assert (entry["request_id"], entry["user"], entry["org"]) == (request_id, user, org)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["ts"])


def test_other_records_are_time_level_logger_message_and_fields() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(TextFormatter())
    log = logging.getLogger(f"test.logs.{uuid.uuid4().hex[:6]}")
    log.addHandler(handler)
    log.propagate = False
    log.warning("generated a secret", extra={"path": "/data/jwt_secret", "note": "two words", "empty": "",
                                              "color_message": "\x1b[1mhidden\x1b[0m"})
    pattern = (rf"\d\d:\d\d:\d\d WARNING {log.name} generated a secret path=/data/jwt_secret "
               r'note="two words" empty=""')
    assert re.fullmatch(pattern, out.getvalue().rstrip("\n")), out.getvalue()


def test_auto_is_text_on_a_terminal_and_json_anywhere_else() -> None:
    controller, terminal_fd = pty.openpty()
    read_end, write_end = os.pipe()
    with open(terminal_fd, "w") as terminal, open(write_end, "w") as pipe:
        assert chosen_format("auto", terminal) == "text"
        assert chosen_format("auto", pipe) == "json"
        assert chosen_format("auto", io.StringIO()) == "json"
        assert chosen_format("json", terminal) == "json"
        assert chosen_format("text", pipe) == "text"
    os.close(controller)
    os.close(read_end)
