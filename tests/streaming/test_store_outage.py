"""PostgreSQL going away under running turns, on a cluster of the test's own that it stops and starts.

While it is down the streams go on, sends are refused 503, and a turn that ends waits (pinged) for its final
write, then gets ``done``; once it is back every reply is stored whole. Past ``GATEWAY_STORE_RETRY_S`` the
client is told ``store_unavailable`` and the recovery sweep stores the reply from its kept events.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import httpx_sse
import pytest

from gateway.embedded import import_pgserver
from tests.api.test_send import eventually, new_chat, read_events
from tests.conftest import Gateway, auth_headers
from tests.servers import free_port

OUTAGE_S = 15.0
TURNS = 20
GAP_MS = 10
# Half the turns end while PostgreSQL is down (their ``done`` waits for it), half after it is back.
SHORT_TOKENS, LONG_TOKENS = 800, 2500
CHECKPOINT_S = 0.1
# Between two sends, so that some turn's checkpoint falls due at every tick of the registry's loop (a
# quarter of ``CHECKPOINT_S``), as with real traffic: turns all due at the same tick leave ticks at which
# no write is tried, so none fails.
ARRIVAL_S = 0.015
ORG = "org-outage"
# As gateway/embedded.py's pgserver does: under root, PostgreSQL runs as this user of its own.
SYSTEM_USER = "pgserver"


class Cluster:
    """A PostgreSQL of the test's own in ``folder``, on a free port of 127.0.0.1, that it stops and starts:
    pgserver's binaries (those of the zero-setup default), run as pgserver runs them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.running = False
        pgserver = import_pgserver()
        self.bin = Path(pgserver._commands.POSTGRES_BIN_PATH)
        self.user: str | None = None
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            self.user = SYSTEM_USER
            pgserver.utils.ensure_user_exists(SYSTEM_USER)
            pgserver.utils.ensure_prefix_permissions(folder)
            entry = pwd.getpwnam(SYSTEM_USER)
            os.chown(folder, entry.pw_uid, entry.pw_gid)

    async def _run(self, program: str, *args: str) -> None:
        """Run one of its programs in a thread (the gateway under test shares this event loop; uvloop's
        subprocesses take no ``user``), its output appended to ``commands.log`` beside the data."""
        command = [str(self.bin / program), "-D", str(self.folder / "data"), *args]
        with (self.folder / "commands.log").open("a") as out:
            done = await asyncio.to_thread(subprocess.run, command, user=self.user, stdin=subprocess.DEVNULL,
                                           stdout=out, stderr=subprocess.STDOUT, timeout=60, check=False)
        if done.returncode != 0:
            logs = [(self.folder / name).read_text(errors="replace")[-3000:]
                    for name in ("commands.log", "server.log") if (self.folder / name).exists()]
            raise AssertionError(f"{' '.join(command)} failed:\n" + "\n".join(logs))

    async def create(self) -> None:
        await self._run("initdb", "--auth=trust", "-U", "postgres", "--encoding=utf8", "--no-sync")

    async def start(self) -> None:
        """Start it and wait until it takes connections (``pg_ctl -w``)."""
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off"
        log = str(self.folder / "server.log")
        await self._run("pg_ctl", "-w", "-t", "60", "-l", log, "-o", options, "start")
        self.running = True

    async def stop(self, mode: str) -> None:
        """Stop it (``fast``: sessions ended, a clean shutdown; ``immediate``: killed, recovered at the next
        start) and wait until it is gone."""
        await self._run("pg_ctl", "-w", "-t", "60", "-m", mode, "stop")
        self.running = False

    async def replies(self, message_ids: list[uuid.UUID]) -> dict[uuid.UUID, asyncpg.Record]:
        """The stored replies, each with how many usage ledger rows it has."""
        conn = await asyncpg.connect(self.url)
        try:
            rows = await conn.fetch(
                "SELECT m.id, m.content, m.status, m.finish_reason,"
                " (SELECT count(*) FROM usage_ledger u WHERE u.message_id = m.id) AS ledger_rows"
                " FROM messages m WHERE m.id = ANY($1::uuid[])", message_ids)
        finally:
            await conn.close()
        return {row["id"]: row for row in rows}


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    """A cluster in a folder of its own under the system's temporary folder, removed afterwards. Not under
    ``tmp_path``: its parent, /tmp/pytest-of-<user>, is made private again by every pytest run that starts
    on the machine, and the cluster's user (not root) would lose its data in the middle of the test."""
    folder = Path(tempfile.mkdtemp(prefix="streamgate-outage-"))
    started = Cluster(folder)
    try:
        await started.create()
        await started.start()
        yield started
    finally:
        if started.running:
            await started.stop("immediate")
        shutil.rmtree(folder)


@dataclass
class Reading:
    """One client's stream of a chat turn (its send, or a resume): every event, with when it came."""

    chat_id: str
    headers: dict[str, str]
    tokens: int
    events: list[httpx_sse.ServerSentEvent] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    pings: int = 0
    first_delta: asyncio.Event = field(default_factory=asyncio.Event)
    all_deltas: asyncio.Event = field(default_factory=asyncio.Event)

    async def read(self, response: httpx.Response) -> None:
        assert response.status_code == 200, await response.aread()
        deltas = 0
        async for event in read_events(response):
            if event.event == "message" and not event.data:  # a ping: httpx_sse yields a comment's end
                self.pings += 1
                continue
            self.events.append(event)
            self.times.append(time.monotonic())
            if event.event == "delta":
                deltas += 1
                self.first_delta.set()
                if deltas == self.tokens:
                    self.all_deltas.set()

    @property
    def seen(self) -> list[tuple[str, str, str]]:
        return [(event.id, event.event, event.data) for event in self.events]

    @property
    def deltas(self) -> list[httpx_sse.ServerSentEvent]:
        return [event for event in self.events if event.event == "delta"]

    @property
    def text(self) -> str:
        return "".join(event.json()["text"] for event in self.deltas)

    @property
    def last(self) -> httpx_sse.ServerSentEvent:
        return self.events[-1]

    @property
    def message_id(self) -> uuid.UUID:
        return uuid.UUID(self.events[0].json()["assistant_message_id"])

    def deltas_between(self, start: float, end: float) -> int:
        return sum(1 for event, at in zip(self.events, self.times, strict=True)
                   if event.event == "delta" and start <= at <= end)


async def new_turn(http: httpx.AsyncClient, tokens: int) -> Reading:
    """A new user's new chat, its model paced to stream ``tokens`` tokens; its stream still to be read."""
    user = auth_headers(f"u-{uuid.uuid4().hex[:8]}", ORG)
    chat_id = await new_chat(http, user, model=f"fake/echo?tokens={tokens}&gap_ms={GAP_MS}")
    return Reading(chat_id, user, tokens)


async def send(http: httpx.AsyncClient, reading: Reading, content: str) -> None:
    async with http.stream("POST", f"/v1/chats/{reading.chat_id}/messages", headers=reading.headers,
                           json={"content": content}) as response:
        await reading.read(response)


async def resume_once_streamed(http: httpx.AsyncClient, sent: Reading, resumed: Reading) -> None:
    """Once ``sent`` has had all its deltas (its turn waits for its final write), resume its turn from the
    start into ``resumed``."""
    await sent.all_deltas.wait()
    async with http.stream("GET", f"/v1/chats/{sent.chat_id}/stream", headers=sent.headers) as response:
        await resumed.read(response)


async def refuse_sends_until(
    http: httpx.AsyncClient, headers: dict[str, str], chat_id: str, until: float
) -> int:
    """Send to ``chat_id`` about once a second until ``until``, each refused 503 ``unavailable``; how many."""
    sent = 0
    while (left := until - time.monotonic()) > 0:
        response = await http.post(f"/v1/chats/{chat_id}/messages", headers=headers,
                                   json={"content": f"sent during the outage {sent}"})
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "unavailable" and response.headers["Retry-After"]
        sent += 1
        await asyncio.sleep(min(1.0, left))  # paced over the outage's length: not waiting for a state
    return sent


async def lapsed_keys(gateway: Gateway, running: list[Reading]) -> list[str]:
    """The keys of running turns gone from Redis: each chat's lease (one stream a chat, stop from
    anywhere) and its kept events' live key (without it, resumers and the recovery sweep take the turn for
    dead)."""
    services = gateway.services
    redis, store, tapes = services.redis, services.quotas.store, services.streams.tapes
    assert tapes is not None
    keys = []
    for reading in running:
        keys += [store.lease_key(ORG, reading.chat_id),
                 tapes.turn_key(uuid.UUID(reading.chat_id), reading.message_id) + ":live"]
    return [key for key in keys if not await redis.exists(key)]


def log(figures: str) -> None:
    """Measured figures, shown with ``pytest -s``."""
    print(f"\n[store outage] {figures}")


async def test_replies_are_stored_whole_after_a_15_s_outage_under_20_turns(
    cluster: Cluster, start_gateway: Callable[..., Any]
) -> None:
    """The issue's must-show. The lease is short (3 s), so the outage outlasts every Redis key a running turn
    renews; pings every second keep a turn that waits for its final write open past the client's 5 s read
    timeout; the turns that wait are resumed meanwhile, and their resumers get the same events."""
    async with (
        start_gateway(database_url=cluster.url, checkpoint_s=CHECKPOINT_S, stream_lease_s=3,
                      ping_s=1) as gateway,
        httpx.AsyncClient(base_url=gateway.url, timeout=httpx.Timeout(5.0)) as http,
    ):
        readings = [await new_turn(http, SHORT_TOKENS if i % 2 else LONG_TOKENS) for i in range(TURNS)]
        short = [reading for reading in readings if reading.tokens == SHORT_TOKENS]
        resumes = [Reading(reading.chat_id, reading.headers, reading.tokens) for reading in short]
        refused_user = auth_headers(f"u-{uuid.uuid4().hex[:8]}", ORG)
        refused_chat = await new_chat(http, refused_user, model="fake/echo")
        tasks = []
        try:
            for i, reading in enumerate(readings):
                tasks.append(asyncio.create_task(send(http, reading, f"turn {i} of the outage test")))
                await asyncio.sleep(ARRIVAL_S)  # turns arrive spread out, not all at once
            await asyncio.wait_for(asyncio.gather(*(r.first_delta.wait() for r in readings)), 30)
            down_at = time.monotonic()
            await cluster.stop("fast")
            tasks += [asyncio.create_task(resume_once_streamed(http, sent, resumed))
                      for sent, resumed in zip(short, resumes, strict=True)]
            refused = await refuse_sends_until(http, refused_user, refused_chat, down_at + OUTAGE_S)
            lapsed = await lapsed_keys(gateway, [r for r in readings if r.tokens == LONG_TOKENS])
            restarting_at = time.monotonic()  # PostgreSQL may take writes before ``start`` returns
            await cluster.start()
            back_at = time.monotonic()
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    rows = await cluster.replies([reading.message_id for reading in readings])

    assert back_at - down_at >= OUTAGE_S
    assert not lapsed, "keys of running turns lapsed in Redis while PostgreSQL was down"
    for reading in readings:
        assert reading.last.event == "done", f"{reading.chat_id}: {reading.last.event} {reading.last.data}"
        assert reading.last.json()["finish_reason"] == "stop"
        assert [event.id for event in reading.events] == [str(n) for n in range(1, len(reading.events) + 1)]
        assert len(reading.deltas) == reading.tokens
        assert reading.deltas_between(down_at, back_at) >= 100, "the stream stalled while PostgreSQL was down"
        row = rows[reading.message_id]
        assert (row["status"], row["finish_reason"], row["ledger_rows"]) == ("complete", "stop", 1)
        assert row["content"] == reading.text
    for sent, resumed in zip(short, resumes, strict=True):
        assert max(t for e, t in zip(sent.events, sent.times, strict=True) if e.event == "delta") < back_at
        assert resumed.times[0] < back_at, "the resume began after PostgreSQL was back"
        assert resumed.seen == sent.seen, f"resumed {resumed.last.event} {resumed.last.data}"
    assert min(reading.times[-1] for reading in short) > restarting_at, \
        "a turn that ended during the outage got done before it was stored"
    waits = [reading.times[-1] - back_at for reading in short]
    log(f"outage {back_at - down_at:.2f} s (stop issued to start returned), {refused} sends refused 503 "
        f"during it; done of the {len(short)} turns that ended during it came {min(waits):.2f}-{max(waits):.2f} s "
        f"after PostgreSQL was back ({min(r.pings for r in short)}+ pings each while waiting); "
        f"all {TURNS} stored complete")


async def test_a_reply_past_the_store_retry_is_stored_by_the_sweep_once_postgresql_is_back(
    cluster: Cluster, start_gateway: Callable[..., Any]
) -> None:
    """PostgreSQL killed during a turn and still down when the final write's retries (1 s) run out."""
    tokens = 200
    async with (
        start_gateway(database_url=cluster.url, checkpoint_s=CHECKPOINT_S, stream_lease_s=1.5,
                      store_retry_s=1) as gateway,
        httpx.AsyncClient(base_url=gateway.url, timeout=httpx.Timeout(10.0)) as http,
    ):
        reading = await new_turn(http, tokens)
        task = asyncio.create_task(send(http, reading, "kept past the retry"))
        try:
            await asyncio.wait_for(reading.first_delta.wait(), 30)
            down_at = time.monotonic()
            await cluster.stop("immediate")
            await asyncio.wait_for(task, 30)
            told_at = time.monotonic()
            assert reading.last.event == "error" and reading.last.json()["code"] == "store_unavailable"
            assert len(reading.deltas) == tokens
            await cluster.start()
            back_at = time.monotonic()

            async def stored_complete() -> bool:
                row = (await cluster.replies([reading.message_id]))[reading.message_id]
                return bool(row["status"] == "complete")

            await eventually(stored_complete)
            stored_at = time.monotonic()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    row = (await cluster.replies([reading.message_id]))[reading.message_id]
    assert (row["finish_reason"], row["content"], row["ledger_rows"]) == ("stop", reading.text, 1)
    log(f"down {back_at - down_at:.2f} s; store_unavailable {told_at - down_at:.2f} s after the stop; "
        f"stored by the sweep {stored_at - back_at:.2f} s after PostgreSQL was back")
