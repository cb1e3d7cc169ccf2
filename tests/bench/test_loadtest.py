"""The load generator and the mock upstream that `gateway loadtest` and `gateway bench` are made of: they
count what the server really sent, over real HTTP, on every path they drive."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from bench.harness import SECRET, TLS_PROVIDER, Bench, store_floors
from bench.loadtest import (
    FirstBodyByte,
    StreamCounter,
    StreamResult,
    Target,
    closed_loop,
    counted_stream,
    one_stream,
    request_bytes,
)
from bench.mock_upstream import start_mock, throwaway_tls
from gateway.app import build_providers
from gateway.settings import Endpoint, Settings
from storage.db import Pool
from tests.conftest import auth_headers
from tests.test_cli import run_on_terminal

WORDS = "one two three four five six seven"  # the fake echoes it as 7 deltas


@pytest.mark.parametrize(("path", "model", "tokens"), [
    ("/v1/chat/completions", "fake/echo", 7),
    ("/v1/chat", "fake/echo", 7),
    ("/v1/chat", "fake/think", 9 + 7),  # "Thinking about: <the 7 words>" as reasoning deltas count too
])
async def test_the_closed_loop_counts_every_streams_tokens(gateway_url: str, path: str, model: str, tokens: int) -> None:
    headers = auth_headers(f"load-{uuid.uuid4().hex[:6]}", f"org-{uuid.uuid4().hex[:6]}")
    target = Target.of(gateway_url + path, headers["Authorization"].split()[1])
    if path == "/v1/chat":
        body: dict[str, object] = {"message": WORDS, "model": model}
    else:
        body = {"model": model, "stream": True, "messages": [{"role": "user", "content": WORDS}]}
    report = await closed_loop(3, 0.3, lambda n: request_bytes(target, path, body), target)
    summary = report.summary()
    assert report.results and summary["errors"] == 0
    assert all((r.status, r.tokens) == (200, tokens) and r.ttft_s is not None for r in report.results)
    assert summary["streams"] == len(report.results)


async def test_a_refused_stream_counts_as_an_error_not_a_stream(gateway_url: str) -> None:
    target = Target.of(gateway_url + "/v1/chat/completions", None)  # no token: 401
    body = {"model": "fake/echo", "stream": True, "messages": [{"role": "user", "content": WORDS}]}
    report = await closed_loop(1, 0.1, lambda n: request_bytes(target, target.path, body), target)
    summary = report.summary()
    assert summary["streams"] == 0 and summary["errors"] == len(report.results) > 0
    assert all(r.status == 401 for r in report.results)


async def test_the_mock_upstream_sends_what_its_model_name_asks() -> None:
    mock = await start_mock()
    try:
        port = mock.sockets[0].getsockname()[1]
        target = Target("127.0.0.1", port, "/v1/chat/completions", {})
        body = {"model": "mock:tokens=5&gap_ms=1", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        result = await one_stream(target, request_bytes(target, target.path, body), stall_after_s=60)
        sink: list[StreamResult] = []
        await counted_stream(target, request_bytes(target, target.path, body), 60, sink)
    finally:
        mock.close()
    assert (result.status, result.tokens, result.gaps, result.stalls) == (200, 5, 4, 0)
    assert [(r.status, r.tokens, r.gaps, r.stalls) for r in sink] == [(200, 5, 4, 0)]


async def test_the_stream_counter_finds_token_frames_split_across_reads() -> None:
    # Reads end anywhere; a marker split between two must be counted once.
    answer = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n"
              + b"".join(b'id: %d\nevent: delta\ndata: {"text":"w%d "}\n\n' % (n, n) for n in range(6))
              + b'id: 7\nevent: done\ndata: {}\n\n')
    for size in (1, 2, 3, 7, 64):
        sink: list[StreamResult] = []
        counter = StreamCounter(b"", None, sink, asyncio.get_running_loop().create_future())
        for start in range(0, len(answer), size):
            counter.data_received(answer[start:start + size])
        assert [(r.status, r.tokens) for r in sink] == [(200, 6)], size


@pytest.mark.parametrize("head, body", [
    (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n", b"id: 7\nevent: delta\n"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"13\r\nid: 7\nevent: delta\n\r\n"),
])
async def test_the_first_body_byte_is_timed_wherever_the_reads_split_the_answer(head: bytes, body: bytes) -> None:
    # Its content's first byte: a chunk's size line is not yet the body.
    answer = head + body
    for size in (1, 5, 60, len(answer)):
        found: asyncio.Future[tuple[int, bytes, float]] = asyncio.get_running_loop().create_future()
        client = FirstBodyByte(b"", found)
        for start in range(0, len(answer), size):
            client.data_received(answer[start:start + size])
        status, first, seconds = found.result()
        assert (status, first) == (200, b"id: 7\nevent: delta\n"[:len(first)]) and first and seconds > 0, size


async def test_an_answer_without_a_body_ends_at_its_head() -> None:
    found: asyncio.Future[tuple[int, bytes, float]] = asyncio.get_running_loop().create_future()
    client = FirstBodyByte(b"", found)
    client.data_received(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert found.result()[:2] == (204, b"")
    lost: asyncio.Future[tuple[int, bytes, float]] = asyncio.get_running_loop().create_future()
    FirstBodyByte(b"", lost).connection_lost(None)
    assert lost.result()[:2] == (0, b"")


def caller_token() -> str:
    return auth_headers(f"load-{uuid.uuid4().hex[:6]}", "org-load")["Authorization"].split()[1]


async def loadtest_output(url: str, *args: str) -> tuple[int, str, str]:
    """``gateway loadtest URL ARGS`` run with a caller's token: its exit code, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "loadtest", url, "--token", caller_token(), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def loadtest(url: str, *args: str) -> tuple[int, dict[str, str], str]:
    """As ``loadtest_output``, with the figures it printed (name -> value) instead of its stdout."""
    code, out, err = await loadtest_output(url, *args)
    return code, dict(re.findall(r"(\w+)=([0-9.e+-]+|nan)", out)), err


async def test_the_loadtest_command_prints_the_figures(gateway_url: str) -> None:
    code, figures, err = await loadtest(gateway_url + "/v1/chat/completions", "--concurrency", "2",
                                        "--duration", "0.3", "--message", WORDS)
    assert code == 0, err
    assert set(figures) >= {"streams", "errors", "streams_per_s", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms",
                            "stall_fraction"}
    assert float(figures["streams"]) > 0 and float(figures["errors"]) == 0
    # Printed to 4 significant digits: each stream is 7 tokens.
    assert float(figures["tokens_per_s"]) == pytest.approx(7 * float(figures["streams_per_s"]), rel=2e-3)


async def test_the_loadtest_command_prints_one_json_object_for_scripts(gateway_url: str) -> None:
    url = gateway_url + "/v1/chat/completions"
    code, out, err = await loadtest_output(url, "--concurrency", "2", "--duration", "0.3", "--message", WORDS,
                                           "--json")
    assert code == 0 and err == ""  # no terminal: no progress either
    result = orjson.loads(out)  # the whole of stdout
    assert out.count("\n") == 1
    assert (result["url"], result["concurrency"], result["duration_s"]) == (url, 2, 0.3)
    assert result["streams"] > 0 and result["errors"] == 0
    assert result["tokens_per_s"] == pytest.approx(7 * result["streams_per_s"])
    assert 0 < result["ttft_p50_ms"] <= result["ttft_p99_ms"]


async def test_the_loadtest_command_shows_its_progress_on_a_terminal(gateway_url: str) -> None:
    # A progress line a second: a run of 1.5 s shows one, then clears it.
    code, out, shown = await run_on_terminal(
        {}, "loadtest", gateway_url + "/v1/chat/completions", "--token", caller_token(), "--concurrency", "2",
        "--duration", "1.5", "--message", WORDS, "--json")
    assert code == 0, shown
    progress = re.findall(r"\r *\d+/1\.5 s  (\d+) streams  (\d+) streams/s  (\d+) errors\x1b\[K", shown)
    assert progress and all(int(done) > 0 and errors == "0" for done, _, errors in progress), shown
    assert shown.endswith("\r\x1b[K")  # cleared before the result is printed
    assert orjson.loads(out)["streams"] >= int(progress[-1][0])  # stdout still holds only the result


async def test_the_gateway_streams_from_the_bench_upstream_over_tls(
    start_gateway: Callable[..., contextlib.AbstractAsyncContextManager[Any]], settings: Settings,
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As `gateway bench` runs its "completions over TLS": the gateway trusts the throwaway certificate.
    context, cert_file = throwaway_tls(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))
    mock = await start_mock(tls=context)
    endpoint = Endpoint(base_url=f"https://127.0.0.1:{mock.sockets[0].getsockname()[1]}/v1")
    providers = build_providers(settings.model_copy(update={"providers": {TLS_PROVIDER: endpoint}}))
    try:
        async with start_gateway(providers, jwt_secret=SECRET) as gateway:
            port = int(gateway.url.rpartition(":")[2])
            bench = Bench(port, os.getpid(), 0, 0.3, database_url)
            try:
                summary = await bench.load("tls", 2, "mock:tokens=5")
            finally:
                await bench.erase()
    finally:
        mock.close()
    assert summary["streams"] > 0 and summary["errors"] == 0
    assert summary["tokens_per_s"] == pytest.approx(5 * summary["streams_per_s"])


async def test_the_loadtest_command_counts_gaps_over_its_threshold_as_stalls(gateway_url: str) -> None:
    # The fake sleeps 30 ms between tokens: every gap is over 10 ms.
    code, figures, err = await loadtest(gateway_url + "/v1/chat", "--model", "fake/echo?gap_ms=30",
                                        "--stall-ms", "10", "--duration", "0.1", "--message", WORDS)
    assert code == 0, err
    assert float(figures["streams"]) > 0 and float(figures["errors"]) == 0
    assert float(figures["stall_fraction"]) == 1.0


async def test_the_loadtest_command_refuses_concurrent_streams_into_one_chat(gateway_url: str) -> None:
    code, figures, err = await loadtest(f"{gateway_url}/v1/chats/{uuid.uuid4()}/messages", "--concurrency", "2")
    assert code == 2 and not figures
    assert "one reply at a time" in err


async def test_the_store_floors_time_each_call_and_leave_no_table(
    database_url: str, redis_url: str, db: Pool
) -> None:
    tables = await db.fetchval("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'bench_commit_%'")
    floors = await store_floors(database_url, redis_url, 20)
    assert sorted(floors) == sorted(f"{name}_{pct}_ms" for name in ("postgres_round_trip", "postgres_commit",
                                                                       "redis_round_trip") for pct in ("p50", "p99"))
    assert all(0 < floors[f"{name}_p50_ms"] <= floors[f"{name}_p99_ms"]
               for name in ("postgres_round_trip", "postgres_commit", "redis_round_trip"))
    assert await db.fetchval("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'bench_commit_%'") == tables
