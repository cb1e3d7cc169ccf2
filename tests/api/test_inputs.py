"""No 5xx for anything a client can send: Hypothesis throws random Unicode (NUL, lone surrogates, control
characters, long text), nesting, numbers (huge, negative, NaN and Infinity as raw tokens, -0) and wrong types
at every endpoint that takes input: bodies, query strings and path parameters.

Each endpoint gets a body that is a valid one with a field changed (so the request reaches deep validation)
and fully random bodies. Every answer is under 500, and a 4xx leaves the caller's rows as they were.

Hypothesis runs synchronously, so each test hands it to a worker thread with a blocking HTTP client while the
gateway, in-process, keeps serving on the test's event loop; the database digest is run on that loop too.

Past 400 lines because every endpoint that takes input has its own valid body to mutate.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import hashlib
import json
import operator
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage.db import Pool
from tests.conftest import auth_headers

MODEL = "fake/echo"
CALL = b"@CALL@"  # in a probe's body: the id of the tool call the caller's chat waits on
FILE = b"@FILE@"  # in a probe's body: the id of the caller's file
UNIQUE = b"@UNIQUE@"  # in a probe's body: a new id each time it is sent
JSON_ANSWER = {"Accept": "application/json", "Content-Type": "application/json"}
BODY_LIMIT = 1_048_576

# The caller's rows, each table's in a fixed order, as one text: a 4xx must leave it as it was.
DIGEST_SQL = """
SELECT concat_ws('|',
  (SELECT string_agg(c::text, ',' ORDER BY c.id) FROM chats c WHERE c.org_id = $1),
  (SELECT string_agg(m::text, ',' ORDER BY m.id) FROM messages m WHERE m.org_id = $1),
  (SELECT string_agg(f::text, ',' ORDER BY f.id) FROM files f WHERE f.org_id = $1),
  (SELECT string_agg(u::text, ',' ORDER BY u.id) FROM usage_ledger u WHERE u.org_id = $1),
  (SELECT string_agg(q::text, ',' ORDER BY q.scope, q.subject_id) FROM quota_overrides q WHERE q.org_id = $1))
"""

# --- Values -----------------------------------------------------------------------------------------------

NASTY_TEXT = [
    "", " ", "\x00", "a\x00b", "\ud800", "\udfff", "x\udc80y", "\ud83d", "\u0000\ud800", "\x1b[31m", "\r\n",
    "\t\x0b\x0c", "\u202e", "\ufeff", "\uffff", "\U0010ffff", "😀" * 50, "..", "../../etc/passwd", "%00", "%",
    "fake/echo?gap_ms=1", "fake/echo#x", "fake/ echo", "fake/..", "null", "NaN", "-0", "1e999", "x" * 201,
    "x" * 20_001, "ǅ" * 5000, "2026-02-30", "2026-01-01T00:00:00", "2026-01-01T00:00:00Z", "9999-12-31",
    "0001-01-01", "\u0661\u0662\u0663\u0664-\u0660\u0661-\u0660\u0661",  # a date in Arabic-Indic digits
    "x" * 10_001, "x" * 1_000_000, "auto", "none", "required", "high", "user", "org", "asc", "desc", "day",
]
HUGE_NUMBERS = [0, -1, 1, 2**31, 2**31 - 1, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**100,
                10**400, 1_000_001, -0.0, 0.5, 1e308, 1e-320, float("nan"), float("inf"), float("-inf")]

texts = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), max_size=40),
    st.sampled_from(NASTY_TEXT),
)
numbers = st.one_of(st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(HUGE_NUMBERS))
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=16,
)


def encode(value: Any) -> bytes:
    """JSON as a client may write it: ``\\ud800`` escapes for lone surrogates, NaN and Infinity as raw
    tokens."""
    return json.dumps(value, ensure_ascii=True, allow_nan=True).encode()


def deeply_nested(depth: int, opener: str) -> bytes:
    closer = {"[": "]", '{"a":': "}"}[opener]
    return (opener * depth + "1" + closer * depth).encode()


raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.builds(deeply_nested, st.sampled_from([10, 300, 5000, 100_000]), st.sampled_from(["[", '{"a":'])),
    st.sampled_from([b"", b"{", b"[]", b"null", b"NaN", b"-Infinity", b'"\\ud800"', b'{"a": "\\u0000"}',
                     b'{"content": "\\udc00"}', b"\xff\xfe{}", b"{}" + b" " * 10, b'{"a":1,"a":2}',
                     b"1" * 5000, b'{"content": "' + b"x" * (BODY_LIMIT + 10) + b'"}']),
    json_values.map(encode),
)


def paths(value: Any, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """Every place in ``value`` (a key of a dict, an index of a list), nested ones too."""
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) \
        else []
    return [place for key, child in children for place in [(*prefix, key), *paths(child, (*prefix, key))]]


@st.composite
def mutated(draw: st.DrawFn, valid: dict[str, Any], fields: list[str]) -> bytes:
    """``valid`` with one field changed to a random value or dropped: a top-level one (of ``fields``, or a
    random key), or one nested inside it (an attachment's, a tool's), so the request reaches deep
    validation."""
    body = copy.deepcopy(valid)
    nested = [place for place in paths(valid) if len(place) > 1]
    if nested and draw(st.booleans()):
        *parents, key = draw(st.sampled_from(nested))
    else:
        parents, key = [], draw(st.one_of(st.sampled_from(fields), texts))
    container = functools.reduce(operator.getitem, parents, body)
    if draw(st.integers(0, 9)) == 0:
        container.pop(key) if isinstance(container, list) else container.pop(key, None)
    else:
        container[key] = draw(st.one_of(texts, json_values))
    return encode(body)


def bodies(valid: dict[str, Any], fields: list[str]) -> st.SearchStrategy[bytes]:
    return st.one_of(st.just(encode(valid)), mutated(valid, fields), mutated(valid, fields), raw_bodies)


def quote(text: str) -> str:
    return urllib.parse.quote(text.encode("utf-8", "surrogatepass"), safe="")


url_texts = texts.filter(lambda text: len(text) <= 2000)  # a URL past 64 KiB is refused by the client itself
segments = st.one_of(url_texts.filter(bool).map(quote), st.sampled_from(
    ["%00", "%ff", "%ed%a0%80", "%2F", "..", "%2e%2e", str(uuid.UUID(int=0)), str(uuid.uuid4()), "x" * 300]))


@st.composite
def query_strings(draw: st.DrawFn, names: list[str]) -> str:
    pairs = draw(st.lists(st.tuples(st.one_of(st.sampled_from(names), url_texts), st.one_of(
        url_texts, numbers.map(str), st.sampled_from(["true", "false", "1", "0", "yes", "%00", "%zz", "%"]))),
        max_size=4))
    return "&".join(
        f"{quote(key)}={value if value.startswith('%') else quote(value)}" for key, value in pairs)


# --- The prober ---------------------------------------------------------------------------------------------

@dataclass
class Probe:
    method: str
    path: str  # may hold {chat}, {file}, {share}: the caller's own, filled in when sent
    query: str = ""
    body: bytes | None = None
    headers: dict[str, str | bytes] = field(default_factory=dict)


@dataclass
class Prober:
    """Sends probes as one caller and checks each answer: under 500, and on a 4xx nothing of the caller's
    rows changed."""

    url: str
    org: str
    headers: dict[str, str]
    db: Pool
    loop: asyncio.AbstractEventLoop
    ids: dict[str, str] = field(default_factory=dict)
    seen: dict[int, int] = field(default_factory=dict)
    # Run before each probe, for the state a probe needs (a reply waiting on a tool's result).
    prepare: Callable[[Prober, httpx.Client], None] | None = None

    def digest(self) -> str:
        async def read() -> str:
            return str(await self.db.fetchval(DIGEST_SQL, self.org))

        rows = asyncio.run_coroutine_threadsafe(read(), self.loop).result()
        return hashlib.sha256(rows.encode()).hexdigest()

    def send(self, http: httpx.Client, probe: Probe) -> httpx.Response:
        path = probe.path.format(**self.ids)
        url = f"{path}?{probe.query}" if probe.query else path
        body = probe.body
        if body:
            body = body.replace(CALL, self.ids.get("call", "").encode())
            body = body.replace(FILE, self.ids["file"].encode()).replace(UNIQUE, uuid.uuid4().hex.encode())
        return http.request(probe.method, url, content=body, headers={**self.headers, **probe.headers})

    def check(self, http: httpx.Client, probe: Probe) -> None:
        if self.prepare:
            self.prepare(self, http)
        before = self.digest()
        response = self.send(http, probe)
        self.seen[response.status_code] = self.seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (probe, response.status_code, response.text[:500])
        if response.status_code >= 400:
            assert self.digest() == before, (probe, response.status_code, response.text[:500])
        else:
            self.ids.pop("call", None)
            if probe.method == "DELETE" or probe.path.endswith("/restore"):
                self.ensure_resources(http)

    def ensure_resources(self, http: httpx.Client) -> None:
        """A live chat, shared, and a file to aim the path parameters at (a probe may have deleted them)."""
        if http.get(f"/v1/chats/{self.ids.get('chat', 'none')}", headers=self.headers).status_code != 200:
            chat = http.post("/v1/chats", headers=self.headers, json={"model": MODEL, "title": "probed"})
            assert chat.status_code == 201, chat.text
            self.ids["chat"] = chat.json()["id"]
        share = http.post(f"/v1/chats/{self.ids['chat']}/share", headers=self.headers)
        assert share.status_code in (200, 201), share.text
        self.ids["share"] = share.json()["share_id"]
        if http.get(f"/v1/files/{self.ids.get('file', 'none')}", headers=self.headers).status_code != 200:
            upload = http.post("/v1/files?name=a.txt", headers={**self.headers, "Content-Type": "text/plain"},
                               content=b"hello")
            assert upload.status_code == 201, upload.text
            self.ids["file"] = upload.json()["id"]

    def explore(self, probes: st.SearchStrategy[Probe], examples: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as http:
            self.ensure_resources(http)

            @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(probes)
            def check(probe: Probe) -> None:
                self.check(http, probe)

            check()


@pytest.fixture
def prober(gateway_url: str, db: Pool) -> Callable[..., Prober]:
    """A fresh user in a fresh org (an admin, when asked) for each test; called on the test's loop."""

    def make(role: str | None = None) -> Prober:
        org, user = f"org-{uuid.uuid4().hex[:8]}", f"fuzz-{uuid.uuid4().hex[:8]}"
        return Prober(gateway_url, org, auth_headers(user, org, role), db, asyncio.get_running_loop())

    return make


async def explore(prober: Prober, probes: st.SearchStrategy[Probe], examples: int = 300) -> None:
    await asyncio.to_thread(prober.explore, probes, examples)
    # Some probes passed and some were refused: the test reached past the first check.
    assert any(200 <= status < 300 for status in prober.seen), prober.seen
    assert any(400 <= status < 500 for status in prober.seen), prober.seen


def json_probes(method: str, path: str, valid: dict[str, Any], fields: list[str] | None = None,
                headers: dict[str, str] | None = None) -> st.SearchStrategy[Probe]:
    return st.builds(Probe, st.just(method), st.just(path), st.just(""),
                     bodies(valid, fields or list(valid)), st.just(headers or JSON_ANSWER))


def query_probes(method: str, path: str, names: list[str]) -> st.SearchStrategy[Probe]:
    return st.builds(Probe, st.just(method), st.just(path), query_strings(names))


CHAT_PATHS = st.one_of(st.just("{chat}"), segments)
PNG_LINK = {"name": "a.png", "media_type": "image/png", "url": "data:image/png;base64,iVBORw0KGgo="}
SEND = {"content": "hi", "model": MODEL, "max_tokens": 4, "temperature": 0.5,
        "client_message_id": UNIQUE.decode(), "metadata": {"k": [1]}, "reasoning_effort": "low",
        "attachments": [{"file_id": FILE.decode()}, PNG_LINK]}
SEND_FIELDS = [*SEND, "tools", "tool_choice", "tool_results", "on_disconnect"]
TOOL = {"type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
SEND_WITH_TOOLS = {**SEND, "tools": [TOOL], "tool_choice": "auto"}


# --- The endpoints ------------------------------------------------------------------------------------------

async def test_create_chat(prober: Callable[..., Prober]) -> None:
    valid = {"title": "t", "model": MODEL, "system_prompt": "be brief", "metadata": {"k": 1},
             "visibility": "private"}
    await explore(prober(), json_probes("POST", "/v1/chats", valid))


async def test_list_chats(prober: Callable[..., Prober]) -> None:
    names = ["q", "limit", "offset", "cursor", "model", "created_after", "created_before", "updated_after",
             "updated_before", "status", "streaming", "scope", "deleted"]
    await explore(prober(), query_probes("GET", "/v1/chats", names))


async def test_read_chat_and_its_messages(prober: Callable[..., Prober]) -> None:
    probes = st.one_of(
        st.builds(Probe, st.just("GET"), CHAT_PATHS.map("/v1/chats/{}".format),
                  query_strings(["message_limit", "message_offset", "order"])),
        st.builds(Probe, st.just("GET"), CHAT_PATHS.map("/v1/chats/{}/messages".format),
                  query_strings(["limit", "offset", "order"])),
    )
    await explore(prober(), probes)


async def test_patch_chat(prober: Callable[..., Prober]) -> None:
    valid = {"title": "t2", "model": MODEL, "system_prompt": "s", "metadata": {}, "tools": [TOOL],
             "tool_choice": "auto", "reasoning_effort": "low"}
    probes = st.one_of(json_probes("PATCH", "/v1/chats/{chat}", valid, [*valid, "visibility"]),
                       st.builds(Probe, st.just("PATCH"), segments.map("/v1/chats/{}".format), st.just(""),
                                 raw_bodies, st.just(JSON_ANSWER)))
    await explore(prober(), probes)


async def test_delete_restore_share_and_stop(prober: Callable[..., Prober]) -> None:
    paths = st.one_of(
        st.tuples(st.just("DELETE"), CHAT_PATHS.map("/v1/chats/{}".format)),
        st.tuples(st.just("POST"), CHAT_PATHS.map("/v1/chats/{}/restore".format)),
        st.tuples(st.just("POST"), CHAT_PATHS.map("/v1/chats/{}/share".format)),
        st.tuples(st.just("DELETE"), CHAT_PATHS.map("/v1/chats/{}/share".format)),
        st.tuples(st.just("POST"), CHAT_PATHS.map("/v1/chats/{}/stop".format)),
    )
    probes = st.builds(lambda route, query, body: Probe(route[0], route[1], query, body),
                       paths, query_strings(["permanent"]), st.one_of(st.none(), raw_bodies))
    await explore(prober(), probes)


async def test_read_shared(prober: Callable[..., Prober]) -> None:
    share_ids = st.one_of(st.just("{share}"), segments)
    probes = st.builds(Probe, st.just("GET"), share_ids.map("/v1/shared/{}".format))
    await explore(prober(), probes, 150)


async def test_send_message(prober: Callable[..., Prober]) -> None:
    probes = st.one_of(json_probes("POST", "/v1/chats/{chat}/messages", SEND, SEND_FIELDS),
                       json_probes("POST", "/v1/chats/{chat}/messages", SEND_WITH_TOOLS, SEND_FIELDS),
                       st.builds(Probe, st.just("POST"), segments.map("/v1/chats/{}/messages".format),
                                 st.just(""), st.just(encode(SEND)), st.just(JSON_ANSWER)))
    await explore(prober(), probes, 500)


def await_tool_call(prober: Prober, http: httpx.Client) -> None:
    """Leave the caller's chat waiting on a tool's result (``fake/echo`` calls a tool it is required to)."""
    if "call" in prober.ids:
        return
    body = {"content": "call it", "tools": [TOOL], "tool_choice": "required", "max_tokens": 4}
    reply = http.post(f"/v1/chats/{prober.ids['chat']}/messages", headers={**prober.headers, **JSON_ANSWER},
                      json=body)
    assert reply.status_code == 200, reply.text
    calls = [p for p in reply.json()["assistant_message"]["parts"] if p["type"] == "tool-call"]
    prober.ids["call"] = calls[0]["tool_call_id"]


async def test_send_tool_results(prober: Callable[..., Prober]) -> None:
    valid = {"tool_results": [{"tool_call_id": CALL.decode(), "output": {"ok": True}, "is_error": False}],
             "max_tokens": 4}
    result = {"tool_call_id": CALL.decode(), "output": "ok", "is_error": False}
    results = st.builds(
        lambda key, value: encode({"max_tokens": 4, "tool_results": [{**result, key: value}]}),
        st.one_of(st.sampled_from(list(result)), texts), json_values)
    probes = st.one_of(json_probes("POST", "/v1/chats/{chat}/messages", valid, SEND_FIELDS),
                       st.builds(Probe, st.just("POST"), st.just("/v1/chats/{chat}/messages"), st.just(""),
                                 results, st.just(JSON_ANSWER)))
    caller = prober()
    caller.prepare = await_tool_call
    await explore(caller, probes, 300)


async def test_chat_turn(prober: Callable[..., Prober]) -> None:
    valid = {"message": "hi", "model": MODEL, "max_tokens": 4, "title": "t", "system_prompt": "s"}
    await explore(prober(), json_probes("POST", "/v1/chat", valid, [*valid, *SEND_FIELDS, "chat_id"]), 400)


async def test_chat_completions(prober: Callable[..., Prober]) -> None:
    valid = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    fields = [*valid, "stream", "stream_options", "max_completion_tokens", "temperature", "top_p", "stop",
              "user", "n", "tools", "tool_choice", "parallel_tool_calls", "response_format",
              "reasoning_effort", "seed"]
    message_keys = st.sampled_from(["role", "content", "tool_calls", "tool_call_id", "name"])
    messages = st.builds(lambda message: encode({**valid, "messages": [{"role": "user", **message}]}),
                         st.dictionaries(message_keys, json_values))
    probes = st.one_of(json_probes("POST", "/v1/chat/completions", valid, fields),
                       st.builds(Probe, st.just("POST"), st.just("/v1/chat/completions"), st.just(""),
                                 messages, st.just(JSON_ANSWER)))
    await explore(prober(), probes, 400)


async def test_ui_chat(prober: Callable[..., Prober]) -> None:
    message = {"id": "m1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}
    valid = {"id": "ui-chat", "messages": [message], "model": MODEL, "trigger": "submit-message"}
    fields = [*valid, "messageId", "tools", "tool_choice", "reasoning_effort"]
    part_keys = st.sampled_from(["type", "text", "url", "mediaType", "toolCallId", "output"])
    parts = st.builds(lambda part: encode({**valid, "messages": [{**message, "parts": [part]}]}),
                      st.dictionaries(part_keys, json_values))
    probes = st.one_of(json_probes("POST", "/v1/ui/chat", valid, fields),
                       st.builds(Probe, st.just("POST"), st.just("/v1/ui/chat"), st.just(""), parts,
                                 st.just(JSON_ANSWER)))
    await explore(prober(), probes)


async def test_usage_report(prober: Callable[..., Prober]) -> None:
    accepts = st.sampled_from([{}, {"Accept": "text/csv"}, {"Accept": "application/json"}])
    probes = st.builds(Probe, st.just("GET"), st.just("/v1/usage/report"),
                       query_strings(["from", "to", "group_by"]), st.none(), accepts)
    await explore(prober(), probes, 200)


async def test_admin_quotas(prober: Callable[..., Prober]) -> None:
    admin = prober("admin")
    valid = {"tokens_per_period": 1000, "period": "day", "requests_per_minute": 10,
             "max_concurrent_streams": 2}
    scopes = st.one_of(st.sampled_from(["user", "org"]), segments)
    targets = st.one_of(st.just(f"user/{admin.org}-member"), st.just(f"org/{admin.org}"),
                        st.tuples(scopes, segments).map("/".join))
    probes = st.builds(Probe, st.sampled_from(["PUT", "GET"]), targets.map("/v1/admin/quotas/{}".format),
                       st.just(""), bodies(valid, list(valid)), st.just(JSON_ANSWER))
    await explore(admin, probes)


def multipart(boundary: str, name: bytes, filename: bytes, media_type: bytes, content: bytes) -> bytes:
    head = b'Content-Disposition: form-data; name="' + name + b'"; filename="' + filename + b'"\r\n'
    return (f"--{boundary}\r\n".encode() + head + b"Content-Type: " + media_type + b"\r\n\r\n" + content
            + f"\r\n--{boundary}--\r\n".encode())


header_bytes = st.binary(max_size=60).map(
    lambda raw: bytes(b for b in raw if b >= 0x20 and b != 0x7F).strip() or b"x")
media_types = st.one_of(header_bytes, st.sampled_from([
    b"text/plain", b"image/png", b"application/pdf", b"text/plain; charset=utf-8", b"multipart/form-data",
    b"multipart/form-data; boundary=", b"*/*"]))
contents = st.one_of(st.binary(max_size=100), st.sampled_from(
    [b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, b"%PDF-1.7\n", b"hello", b"\xff\xd8\xff", b""]))


@st.composite
def uploads(draw: st.DrawFn) -> Probe:
    query = draw(query_strings(["name"]))
    if draw(st.booleans()):
        return Probe("POST", "/v1/files", query, draw(contents), {"Content-Type": draw(media_types)})
    boundary = draw(st.sampled_from(["b0undary", "x" * 70, "-"]))
    field_name = draw(st.sampled_from([b"file", b"other", b"", b"fi\xffle"]))
    body = multipart(boundary, field_name, draw(header_bytes), draw(media_types), draw(contents))
    declared = draw(st.sampled_from([f"multipart/form-data; boundary={boundary}", "multipart/form-data",
                                     "multipart/form-data; boundary=wrong"]))
    return Probe("POST", "/v1/files", query, draw(st.one_of(st.just(body), st.binary(max_size=100))),
                 {"Content-Type": declared})


async def test_files(prober: Callable[..., Prober]) -> None:
    file_paths = st.one_of(st.just("{file}"), segments).map("/v1/files/{}".format)
    probes = st.one_of(
        uploads(),
        query_probes("GET", "/v1/files", ["cursor", "limit", "offset"]),
        st.builds(Probe, st.just("GET"), file_paths),
        st.builds(Probe, st.just("GET"), file_paths.map("{}/content".format)),
        st.builds(Probe, st.just("DELETE"), file_paths),
    )
    await explore(prober(), probes, 500)
