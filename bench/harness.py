"""``gateway bench`` (and ``make bench``): the gateway measured against a direct baseline in the same run.

The gateway runs as ``gateway serve`` with one worker pinned to CPU 0; this harness (load generator and
mock upstream, one event loop) is pinned to CPU 1. Every scenario also runs "direct" (load generator
straight to the mock), and gateway figures are reported as overhead and as ratios to direct. The mock also
serves https behind a throwaway certificate, so completions run over a TLS upstream beside the plaintext one.
Resumable streams are measured on gateways of their own beside the main one (``resumable_streams``), with
and without ``GATEWAY_RESUMABLE``, two of them with their Redis behind a counting relay (bench/redis_proxy.py).
Each phase is announced on stderr as it starts; the table goes to stdout and the raw figures to
``<data dir>/bench/<date>.json`` (``--save``: ``bench/results/<date>.json``). docs/performance.md explains
the method.

Past 400 lines because each scenario is a few lines over the same gateway process, mock and chats; the
module is the harness they share.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gc
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import uvloop
from redis.asyncio import Redis

from bench.loadtest import (
    Dechunker,
    StreamResult,
    Target,
    closed_loop,
    counted_stream,
    first_body_byte,
    get_request,
    one_stream,
    percentile,
    request_bytes,
)
from bench.mock_upstream import MockUpstream, start_mock, throwaway_tls
from bench.redis_proxy import Tally, counting_proxy
from bench.report import PATHS, report
from gateway.edge.auth import mint_token
from gateway.embedded import with_services
from gateway.settings import Settings
from storage.chats import erase_org
from storage.quotas import QuotaDefaults, QuotaStore
from storage.scripts import Script, ScriptClient

SECRET = "bench-secret-" + "b" * 32
UNPACED = "mock:tokens=64"
PACED = "mock:tokens=100000&gap_ms=100"  # 10 tokens/s, longer than any measurement window
PACED_RATE = 10  # tokens/s of a PACED stream
IDLE = "mock:tokens=1&hold_ms=3600000"
SEED_TURNS = 32  # 64 messages a chat before the statistics are taken (see Bench.seed)
LEVELS = (500, 750, 1000, 1250, 1500, 2000, 3000, 4000, 5000, 6000, 8000, 10_000, 12_000, 16_000)
QUICK_LEVELS = (500, 1000)
ROUND_TRIP_STREAMS = 1000  # paced streams while a worker's Redis round trips are counted
SPARE_FDS = 1000  # the stores' connections, the files a process holds open, and slack
TLS_PROVIDER = "mocktls"  # the gateway's named endpoint for the mock's https side
# An agent turn: fake/think reasons (a delta a word of the message, 32 at most) before it calls the tool.
AGENT_TURN: dict[str, object] = {"content": " ".join(["bench"] * 32), "model": "fake/think", "reasoning_effort": "low",
              "tool_choice": "required", "tools": [{"type": "function", "function": {
                  "name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]}


def capacity_levels() -> tuple[int, ...]:
    """The capacity ladder, up to what this process's descriptors allow: a stream takes two here (its
    client and the mock's end) and two in the gateway, which inherits the limit. The soft limit is raised
    to the hard one first."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return tuple(level for level in LEVELS if 2 * level + SPARE_FDS <= soft)


def pin_to(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > cpu:
        os.sched_setaffinity(0, {cpu})


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """The CPU time (user and system) process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def post_json(target: Target, path: str, body: dict[str, Any]) -> Any:
    reader, writer = await asyncio.open_connection(target.host, target.port)
    try:
        writer.write(request_bytes(target, path, body))
        raw = await reader.read()
    finally:
        writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        payload = Dechunker().feed(payload)
    return orjson.loads(payload)


class Progress:
    """A line on stderr as each phase starts, with the time since the run began: a full run takes many
    minutes, and its table comes only at the end."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def phase(self, text: str) -> None:
        elapsed = int(time.monotonic() - self.started)
        print(f"[{elapsed // 60:2d}:{elapsed % 60:02d}] {text} ...", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class TlsUpstream:
    """The mock's https side: its port and the certificate file the gateway is told to trust."""

    port: int
    cert_file: Path


@contextlib.asynccontextmanager
async def gateway_server(
    settings: Settings, mock_port: int, log: Path, tree: Path | None = None, tls: TlsUpstream | None = None,
    overrides: dict[str, str] | None = None,
) -> AsyncIterator[tuple[int, int]]:
    """``gateway serve`` pinned to CPU 0 (from the source ``tree`` given, else this one); yields its port
    and pid once /ready answers. With ``tls``, models ``mocktls/...`` go to the mock over https. Its Redis
    keys have a prefix of their own unless ``overrides`` (environment variables) name one."""
    with socket_port() as port:
        env = {**os.environ, "GATEWAY_DATABASE_URL": settings.database_url or "",
               "GATEWAY_REDIS_URL": settings.redis_url or "", "GATEWAY_JWT_SECRET": SECRET,
               "GATEWAY_REDIS_PREFIX": f"bench-{uuid.uuid4().hex[:6]}:",
               "OPENAI_BASE_URL": f"http://127.0.0.1:{mock_port}/v1", "OPENAI_API_KEY": "bench",
               **(overrides or {})}
        if tree is not None:
            env["PYTHONPATH"] = str(tree)
        if tls is not None:
            env["GATEWAY_PROVIDERS"] = orjson.dumps(
                {TLS_PROVIDER: {"base_url": f"https://127.0.0.1:{tls.port}/v1"}}).decode()
            env["SSL_CERT_FILE"] = str(tls.cert_file)
        pin = ["taskset", "-c", "0"] if (os.cpu_count() or 1) > 1 else []
        with log.open("wb") as out:
            process = subprocess.Popen([*pin, sys.executable, "-m", "gateway", "serve", "--port", str(port)],
                                       env=env, stdout=out, stderr=out, cwd=tree)
        try:
            await until_ready(port)
            yield port, process.pid
        finally:
            process.terminate()
            await until_exited(process, 30)


async def until_exited(process: subprocess.Popen[bytes], seconds: float) -> None:
    """Until ``process`` has exited, killed past ``seconds``; the loop runs meanwhile (a gateway behind the
    Redis relay needs it to shut down)."""
    deadline = time.monotonic() + seconds
    while process.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if process.poll() is None:
        process.kill()
        process.wait()


async def until_ready(port: int, seconds: float = 60) -> None:
    """Until the server booting on ``port`` answers ``GET /ready`` with 200."""
    for _ in range(int(seconds * 10)):
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /ready HTTP/1.0\r\n\r\n")
            answered = b" 200 " in await reader.readline()
            writer.close()
            if answered:
                return
        await asyncio.sleep(0.1)  # waiting for a subprocess to boot: nothing to await but time
    raise RuntimeError(f"nothing answered /ready on port {port} in {seconds:.0f} s")


@contextlib.contextmanager
def socket_port() -> Any:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    yield port


def answered(sinks: list[list[StreamResult]]) -> list[StreamResult]:
    """The results of streams whose answer has started, each stream with a sink of its own."""
    return [result for sink in sinks for result in sink]


async def until_started(sinks: list[list[StreamResult]], tasks: list[asyncio.Task[Any]], count: int) -> None:
    """Until ``count`` streams have their first token, every task has ended, or a minute has passed."""
    deadline = time.monotonic() + 60
    while (sum(1 for r in answered(sinks) if r.ttft_s is not None) < count and time.monotonic() < deadline
           and not all(task.done() for task in tasks)):
        await asyncio.sleep(0.1)


@contextlib.contextmanager
def harness_frozen() -> Iterator[list[float]]:
    """For one measurement window: the harness's own objects (thousands of streams, both ends) moved out
    of the collector's reach, so that no collection walks them mid-window, and its collection pauses
    (seconds) recorded, so that a pause of the harness's shows beside the stalls it would cause."""
    pauses: list[float] = []
    started = [0.0]

    def timed(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append(time.perf_counter() - started[0])

    gc.freeze()  # no collection first: with thousands of streams it would be the very pause to avoid
    gc.callbacks.append(timed)
    try:
        yield pauses
    finally:
        gc.callbacks.remove(timed)
        gc.unfreeze()


class Bench:
    def __init__(self, gateway_port: int, gateway_pid: int, mock_port: int, seconds: float,
                 database_url: str, progress: Progress | None = None) -> None:
        self.database_url = database_url
        self.progress = progress or Progress()
        self.org = f"bench-{uuid.uuid4().hex[:8]}"  # its data is erased after the run (``erase_org``)
        token = mint_token(SECRET, "bench", self.org, ttl_s=86_400)
        self.gateway = Target("127.0.0.1", gateway_port, "/", {"Authorization": f"Bearer {token}"})
        self.mock = Target("127.0.0.1", mock_port, "/", {})
        self.pid = gateway_pid
        self.seconds = seconds
        self.chats: list[str] = []

    def beside(self, gateway: tuple[int, int]) -> Bench:
        """This bench's org, token and chats on another gateway (``(port, pid)``) of the same stores."""
        other = Bench(gateway[0], gateway[1], self.mock.port, self.seconds, self.database_url, self.progress)
        other.org, other.gateway, other.chats = self.org, replace(self.gateway, port=gateway[0]), self.chats
        return other

    async def erase(self) -> None:
        """What the run stored: a full run, about 10,000 chats (the capacity scenario opens one per stream)."""
        db = await asyncpg.connect(self.database_url)
        try:
            await erase_org(db, self.org)
        finally:
            await db.close()

    async def make_chats(self, count: int) -> None:
        while len(self.chats) < count:
            chat = await post_json(self.gateway, "/v1/chats", {"model": f"openai/{UNPACED}"})
            self.chats.append(chat["id"])

    async def seed(self) -> None:
        """Every chat filled past the history window, then planner statistics, as autovacuum keeps them on a
        server that runs it (this machine's PostgreSQL runs without). PostgreSQL caps its estimate of a
        chat's messages at the longest chat it saw: analyzed with chats of one turn, it plans a history read
        as fetch-the-whole-chat-and-sort (below about 40 messages a chat the walk back along the index
        looks dearer), and the c=1 runs' chat grows by thousands of messages, its read from 0.1 to over
        1 ms. With chats of SEED_TURNS turns the walk is the plan however long a chat grows."""

        async def fill(n: int) -> None:  # a chat takes one stream at a time
            for _ in range(SEED_TURNS):
                result = await one_stream(self.gateway, self.request("chat", UNPACED, n))
                assert result.status == 200, result

        await asyncio.gather(*(fill(n) for n in range(len(self.chats))))
        db = await asyncpg.connect(self.database_url)
        try:
            await db.execute("ANALYZE chats; ANALYZE messages")
        finally:
            await db.close()

    def request(self, path: str, model: str, n: int) -> bytes:
        if path == "direct":
            return request_bytes(self.mock, "/v1/chat/completions", {
                "model": model, "stream": True, "messages": [{"role": "user", "content": "bench"}]})
        if path in ("completions", "tls"):
            provider = TLS_PROVIDER if path == "tls" else "openai"
            return request_bytes(self.gateway, "/v1/chat/completions", {
                "model": f"{provider}/{model}", "stream": True, "messages": [{"role": "user", "content": "bench"}]})
        if path == "chat":
            return request_bytes(self.gateway, f"/v1/chats/{self.chats[n]}/messages",
                                 {"content": "bench", "model": f"openai/{model}"})
        if path == "agent":  # reasoning, then a required tool call: their events, parts and stored calls
            return request_bytes(self.gateway, f"/v1/chats/{self.chats[n]}/messages", AGENT_TURN)
        if path == "chat-id":  # as the AI SDK submits: each message with an id of its own
            return request_bytes(self.gateway, f"/v1/chats/{self.chats[n]}/messages",
                                 {"content": "bench", "model": f"openai/{model}", "client_message_id": uuid.uuid4().hex})
        return request_bytes(self.gateway, "/v1/chat", {"message": "bench", "model": f"openai/{model}"})

    def target(self, path: str) -> Target:
        return self.mock if path == "direct" else self.gateway

    async def load(self, path: str, concurrency: int, model: str = UNPACED) -> dict[str, float]:
        requests = [self.request(path, model, n) for n in range(concurrency)]
        # chat-id sends a new body (a new client id) every time; the others, each slot's body again
        make = (lambda n: self.request(path, model, n)) if path == "chat-id" else requests.__getitem__
        report = await closed_loop(concurrency, self.seconds, make, self.target(path))
        return report.summary()

    async def load_and_cpu(self, path: str, concurrency: int) -> dict[str, float]:
        """``load``, with the gateway's CPU time a stream: on a shared machine, steadier than streams/s."""
        before = cpu_seconds(self.pid)
        summary = await self.load(path, concurrency)
        return {**summary, "worker_cpu_ms_per_stream": (cpu_seconds(self.pid) - before) * 1000
                / max(summary["streams"], 1)}

    async def ttft_and_throughput(self, paths: tuple[str, ...]) -> dict[str, Any]:
        self.progress.phase(f"seeding 100 chats with {SEED_TURNS} turns each")
        await self.make_chats(100)
        await self.seed()
        out: dict[str, Any] = {}
        each = f"{', '.join(PATHS.get(p, p) for p in paths)}; {self.seconds:g} s each"
        for concurrency in (1, 100):
            self.progress.phase(f"time to first token, concurrency {concurrency} ({each})")
            for path in paths:
                out[f"c{concurrency}_{path}"] = await self.load(path, concurrency)
        self.progress.phase(f"saturation, concurrency 64, 64 unpaced deltas a stream ({each})")
        for path in paths:
            out[f"saturation_{path}"] = await self.load(path, 64)
        return out

    @contextlib.asynccontextmanager
    async def paced_streams(self, count: int, path: str = "new-chat") -> AsyncIterator[list[list[StreamResult]]]:
        """``count`` streams at 10 tokens/s (stream ``n`` in chat ``n`` on the chat path), each with a sink
        of its own, started; cancelled when the block ends."""
        sinks: list[list[StreamResult]] = [[] for _ in range(count)]
        tasks = []
        try:
            for n in range(count):
                tasks.append(asyncio.create_task(counted_stream(
                    self.gateway, self.request(path, PACED, n), 0.2, sinks[n])))
                if n % 200 == 199:
                    await asyncio.sleep(0.05)  # open the connections in waves, as a listen backlog wants
            await until_started(sinks, tasks, count)
            yield sinks
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def paced_window(self, count: int, window: Callable[[], Awaitable[dict[str, float]]] | None = None,
                           path: str = "new-chat") -> dict[str, float]:
        """``count`` paced streams through one measurement window with the harness's objects frozen: how
        many opened and stalled in it, the gateway's RSS and its CPU per token, and the figures ``window``
        (else a sleep of ``seconds``) returns."""
        async with self.paced_streams(count, path) as sinks:
            sink = answered(sinks)
            with harness_frozen() as pauses:
                window_start = {id(r): r.stalls for r in sink}
                cpu, started = cpu_seconds(self.pid), time.perf_counter()
                figures = await window() if window is not None else {}
                if window is None:
                    await asyncio.sleep(self.seconds)
                cpu_share = (cpu_seconds(self.pid) - cpu) / (time.perf_counter() - started)
                stalled = sum(1 for r in sink if r.stalls > window_start.get(id(r), 0))
            opened = sum(1 for r in sink if r.status == 200)
            rss_mib = rss_kib(self.pid) / 1024
        return {"streams": count, "opened": opened, "stalled": stalled, "stall_fraction": stalled / max(opened, 1),
                "rss_mib": rss_mib, "harness_gc_max_ms": max(pauses, default=0.0) * 1000,
                "worker_cpu_share": cpu_share, "worker_us_per_token": cpu_share * 1e6 / max(opened * PACED_RATE, 1),
                **figures}

    async def capacity(self, levels: tuple[int, ...]) -> list[dict[str, float]]:
        """Streams at 10 tokens/s, more at each level, until over 0.1% of them stall (a gap over 200 ms) or
        the ladder ends."""
        steps = []
        for level in levels:
            self.progress.phase(f"capacity {level:,} streams at 10 tokens/s")
            step = await self.paced_window(level)
            steps.append(step)
            opened, stalled = step["opened"], step["stalled"]
            await asyncio.sleep(1)  # let the gateway store the cancelled streams before the next level
            if opened < level or stalled / max(opened, 1) > 0.001:
                break
        return steps

    async def memory(self, low: int, high: int) -> dict[str, float]:
        """RSS with idle open streams (first token sent, then silence): the slope between two counts."""
        self.progress.phase(f"memory with {low:,} then {high:,} idle open streams")
        boot = rss_kib(self.pid)
        tasks: list[asyncio.Task[None]] = []
        sinks: list[list[StreamResult]] = []
        readings = {}
        for count in (low, high):
            while len(tasks) < count:
                sinks.append([])
                tasks.append(asyncio.create_task(counted_stream(
                    self.gateway, self.request("completions", IDLE, 0), None, sinks[-1])))
                if len(tasks) % 200 == 0:
                    await asyncio.sleep(0.05)
            await until_started(sinks, tasks, count)
            await asyncio.sleep(1)
            readings[count] = rss_kib(self.pid)
            readings[-count] = sum(1 for r in answered(sinks) if r.ttft_s is not None)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return {"boot_mib": boot / 1024, "opened_low": readings[-low], "opened_high": readings[-high],
                f"rss_at_{low}_mib": readings[low] / 1024,
                f"rss_at_{high}_mib": readings[high] / 1024,
                "kib_per_idle_stream": (readings[high] - readings[low]) / (high - low)}

    async def abort(self, samples: int) -> dict[str, float]:
        """From the client hanging up to the upstream connection closing, through the chat path."""
        self.progress.phase(f"abort to upstream close ({samples} samples)")
        await self.make_chats(1)
        latencies = []
        for _ in range(samples):
            hung_up = 0.0
            before = len(MockUpstream.aborted)

            async def hang_up(writer: asyncio.StreamWriter) -> bool:
                nonlocal hung_up
                writer.transport.abort()
                hung_up = time.monotonic()
                return True

            await one_stream(self.gateway, self.request("new-chat", PACED, 0), on_first_token=hang_up)
            for _ in range(1000):
                if len(MockUpstream.aborted) > before:
                    break
                await asyncio.sleep(0.001)
            if len(MockUpstream.aborted) > before:
                latencies.append(MockUpstream.aborted[-1] - hung_up)
        latencies.sort()
        return {"samples": len(latencies), "p50_ms": percentile(latencies, 50) * 1000,
                "p99_ms": percentile(latencies, 99) * 1000}


    async def saturation_beside(self, off: Bench, rounds: int) -> dict[str, Any]:
        """The chat path at saturation (concurrency 64, 64 unpaced deltas) on this gateway and on ``off``,
        alternating which goes first, ``rounds`` times: each pass's figures, the medians, and the median of
        the rounds' ratios (this / ``off``), each taken minutes apart at most."""
        passes = []
        for round_ in range(rounds):
            order = (("on", self), ("off", off)) if round_ % 2 == 0 else (("off", off), ("on", self))
            passes.append({name: await bench.load_and_cpu("chat", 64) for name, bench in order})

        def median(name: str, key: str) -> float:
            return statistics.median(p[name][key] for p in passes)

        return {"rounds": passes, "on_streams_per_s": median("on", "streams_per_s"),
                "off_streams_per_s": median("off", "streams_per_s"),
                "ratio": statistics.median(p["on"]["streams_per_s"] / p["off"]["streams_per_s"] for p in passes),
                "on_cpu_ms_per_stream": median("on", "worker_cpu_ms_per_stream"),
                "off_cpu_ms_per_stream": median("off", "worker_cpu_ms_per_stream")}

    async def redis_round_trips(self, count: int, tally: Tally) -> dict[str, float]:
        """The worker's Redis round trips and bytes a second, as the relay in front of its Redis counts them
        (bench/redis_proxy.py), through one window of ``count`` paced streams."""

        async def window() -> dict[str, float]:
            before, started = tally.copy(), time.perf_counter()
            await asyncio.sleep(self.seconds)
            elapsed = time.perf_counter() - started
            return {"window_s": elapsed, "redis_connections": tally.connections, **tally.rates(before, elapsed)}

        return await self.paced_window(count, window)

    async def resume_latency(self, resumer: Bench, turns: int, samples: int) -> dict[str, float]:
        """From a resume's request (``GET /v1/chats/{id}/stream`` on a new connection to ``resumer``,
        another instance on the same stores and key prefix) to the first replayed byte of its body, while
        this gateway runs ``turns`` paced chat turns, resumed in turn. Each names as its Last-Event-ID the
        event three before the last this harness's own reader of the turn has seen: a client that lost its
        last three events. After each, ``GET /health`` on ``resumer`` timed alike: the floor of a request
        to that instance on this machine at that moment, beside which the resume's tail reads."""
        await self.make_chats(turns)
        timings: list[float] = []
        floor: list[float] = []
        errors = 0
        async with self.paced_streams(turns, "chat") as sinks:
            await asyncio.sleep(0.5)  # a few tokens into every turn
            for n in range(samples):
                chat = n % turns
                seen = sinks[chat][0].tokens if sinks[chat] else 0  # events: start (1), then a token each
                request = get_request(resumer.gateway, f"/v1/chats/{self.chats[chat]}/stream",
                                      {"Last-Event-ID": str(max(1, seen - 2))})
                status, body, seconds = await first_body_byte(resumer.gateway, request)
                if status == 200 and body.startswith(b"id: "):
                    timings.append(seconds)
                else:
                    errors += 1
                status, _, seconds = await first_body_byte(resumer.gateway, get_request(resumer.gateway, "/health", {}))
                if status == 200:
                    floor.append(seconds)
        timings.sort()
        floor.sort()
        return {"samples": len(timings), "errors": errors, "live_turns": turns,
                "p50_ms": percentile(timings, 50) * 1000, "p99_ms": percentile(timings, 99) * 1000,
                "health_p50_ms": percentile(floor, 50) * 1000, "health_p99_ms": percentile(floor, 99) * 1000}


async def resumable_streams(main: Bench, settings: Settings, mock_port: int, quick: bool) -> dict[str, Any]:
    """Resumable streams' cost, on gateways of their own beside the main one (idle meanwhile), all on CPU
    0: a pair started alike but for ``GATEWAY_RESUMABLE`` at saturation; a third instance resuming the
    first's live turns; then each setting again at 1,000 paced streams with its Redis behind a counting
    relay (as the relay adds a hop to every Redis call, it is kept out of the other figures)."""
    progress, logs = main.progress, Path(tempfile.gettempdir())
    prefix = f"bench-{uuid.uuid4().hex[:6]}:"  # the instance that resumes reads the first one's keys
    on_env = {"GATEWAY_RESUMABLE": "true", "GATEWAY_REDIS_PREFIX": prefix}
    out: dict[str, Any] = {}
    rounds = 4 if quick else 6
    progress.phase(f"resumable streams: chat path at saturation, events kept and not, alternating ({rounds} rounds)")
    async with (gateway_server(settings, mock_port, logs / "streamgate-bench-resumable.log", overrides=on_env) as on,
                gateway_server(settings, mock_port, logs / "streamgate-bench-unresumable.log",
                               overrides={"GATEWAY_RESUMABLE": "false"}) as off):
        out["saturation"] = await main.beside(on).saturation_beside(main.beside(off), rounds)
        samples = 100 if quick else 200
        progress.phase(f"resumable streams: resumed on another instance ({samples} samples)")
        async with gateway_server(settings, mock_port, logs / "streamgate-bench-resumer.log",
                                  overrides=on_env) as resumer:
            out["resume"] = await main.beside(on).resume_latency(main.beside(resumer), 20, samples)
    assert settings.redis_url
    for mode in ("on", "off"):
        progress.phase(f"resumable streams {mode}: Redis round trips at {ROUND_TRIP_STREAMS:,} paced streams")
        async with (counting_proxy(settings.redis_url) as proxy,
                    gateway_server(settings.model_copy(update={"redis_url": proxy.url}), mock_port,
                                   logs / f"streamgate-bench-relayed-{mode}.log",
                                   overrides={"GATEWAY_RESUMABLE": "true" if mode == "on" else "false"}) as relayed):
            out[f"round_trips_{mode}"] = await main.beside(relayed).redis_round_trips(ROUND_TRIP_STREAMS, proxy.tally)
            await asyncio.sleep(1)  # let the gateway store the cancelled streams before it stops
    return out


async def quota_check(redis_url: str, samples: int) -> dict[str, float]:
    """The quota admission's own latency: one EVALSHA per check, measured from here."""
    redis = Redis.from_url(redis_url)
    store = QuotaStore(redis, f"bench-q-{uuid.uuid4().hex[:6]}:", QuotaDefaults(10**12, 10**12, "day", 10**9, 10**6),
                       30, lambda *_: _none())
    timings = []
    for n in range(samples):
        started = time.perf_counter()
        decision = await store.reserve("bench-org", "bench", f"s{n}", 100)
        timings.append(time.perf_counter() - started)
        if decision.ticket:
            await store.settle(decision.ticket, 50)
    await store.aclose()
    await redis.aclose()
    timings.sort()
    return {"samples": samples, "p50_ms": percentile(timings, 50) * 1000, "p99_ms": percentile(timings, 99) * 1000}


async def _none() -> None:
    return None


async def store_floors(database_url: str, redis_url: str, samples: int) -> dict[str, float]:
    """What the stores alone take on this machine, measured from here: a PostgreSQL round trip, a one-row
    commit (a WAL flush: the chat path stores the user's message before its first token) and a Redis round
    trip (a script that only returns, over the quota scripts' own connection: the admission's floor). The
    chat path's time to first token cannot beat the completions path's by less than a read and a commit."""
    floors: dict[str, float] = {}

    async def timed_calls(name: str, call: Callable[[], Awaitable[Any]]) -> None:
        timings = []
        for _ in range(samples):
            started = time.perf_counter()
            await call()
            timings.append(time.perf_counter() - started)
        timings.sort()
        floors[f"{name}_p50_ms"] = percentile(timings, 50) * 1000
        floors[f"{name}_p99_ms"] = percentile(timings, 99) * 1000

    db = await asyncpg.connect(database_url)
    table = f"bench_commit_{uuid.uuid4().hex[:8]}"
    try:
        await db.execute(f"CREATE TABLE {table} (n int)")
        await timed_calls("postgres_round_trip", lambda: db.fetchval("SELECT 1"))
        await timed_calls("postgres_commit", lambda: db.execute(f"INSERT INTO {table} VALUES (1)"))
    finally:
        await db.execute(f"DROP TABLE IF EXISTS {table}")
        await db.close()
    redis = Redis.from_url(redis_url)
    scripts = ScriptClient.like(redis)
    nothing = Script("return 1")
    try:
        await timed_calls("redis_round_trip", lambda: scripts.run(nothing, [], []))
    finally:
        await scripts.aclose()
        await redis.aclose()
    return floors


async def run_bench(settings: Settings, seconds: float, quick: bool, scratch: Path) -> dict[str, Any]:
    pin_to(1)
    progress = Progress()
    fit = capacity_levels()  # before the gateway starts: it inherits the raised limit
    levels = QUICK_LEVELS if quick else fit
    mock = await start_mock()
    tls_context, cert_file = throwaway_tls(scratch)
    tls_mock = await start_mock(tls=tls_context)
    tls = TlsUpstream(tls_mock.sockets[0].getsockname()[1], cert_file)
    mock_port = mock.sockets[0].getsockname()[1]
    log = Path(tempfile.gettempdir()) / "streamgate-bench-gateway.log"
    progress.phase(f"starting the gateway (its log: {log})")
    async with gateway_server(settings, mock_port, log, tls=tls) as (port, pid):
        assert settings.database_url and settings.redis_url
        bench = Bench(port, pid, mock_port, seconds, settings.database_url, progress)
        results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                                   "seconds_per_measurement": seconds, "quick": quick}
        try:
            # Memory first, on a fresh process: later loads leave freed memory that new streams would reuse.
            results["memory"] = await bench.memory(200, 1000) if quick else await bench.memory(1000, 5000)
            results["throughput"] = await bench.ttft_and_throughput(("direct", "completions", "tls", "chat", "agent"))
            floor_samples = 500 if quick else 2000
            progress.phase(f"store floors ({floor_samples} calls each)")
            results["floors"] = await store_floors(settings.database_url, settings.redis_url, floor_samples)
            results["abort"] = await bench.abort(20 if quick else 100)
            results["resumable"] = await resumable_streams(bench, settings, mock_port, quick)
            results["capacity"] = await bench.capacity(levels)
            results["capacity_cut_by_descriptors"] = not quick and fit != LEVELS
        finally:
            await bench.erase()
    quota_samples = 2000 if quick else 10_000
    progress.phase(f"quota check ({quota_samples} samples)")
    results["quota"] = await quota_check(settings.redis_url, quota_samples)
    mock.close()
    tls_mock.close()
    return results


def main(settings: Settings, seconds: float, quick: bool, out_dir: Path) -> None:
    with with_services(settings) as ready, tempfile.TemporaryDirectory(prefix="streamgate-bench-") as scratch:
        results = uvloop.run(run_bench(ready, seconds, quick, Path(scratch)))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{datetime.date.today().isoformat()}.json"
    path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    print(report(results))
    print(f"results written to {path}", file=sys.stderr)
