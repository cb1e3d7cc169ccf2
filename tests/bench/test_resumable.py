"""The bench's resumable-stream figures, each measured on small gateways in this process: saturation with
events kept and not, a worker's Redis round trips counted by the relay, and a resume on another instance."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from bench.harness import SECRET, Bench
from bench.mock_upstream import start_mock
from bench.redis_proxy import counting_proxy
from gateway.app import build_providers
from gateway.settings import Settings

Starter = Callable[..., contextlib.AbstractAsyncContextManager[Any]]


@pytest.fixture
async def mock_port(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[int]:
    """The bench's mock upstream, as the gateways' ``openai`` provider."""
    mock = await start_mock()
    port: int = mock.sockets[0].getsockname()[1]
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{port}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "bench")
    yield port
    mock.close()


@contextlib.asynccontextmanager
async def bench_on(start_gateway: Starter, settings: Settings, database_url: str, mock_port: int,
                   **overrides: Any) -> AsyncIterator[Bench]:
    async with start_gateway(build_providers(settings), jwt_secret=SECRET, **overrides) as gateway:
        bench = Bench(int(gateway.url.rpartition(":")[2]), os.getpid(), mock_port, 0.5, database_url)
        try:
            yield bench
        finally:
            await bench.erase()


async def test_saturation_alternates_the_two_gateways_and_gives_the_median_ratio(
    start_gateway: Starter, settings: Settings, database_url: str, mock_port: int,
) -> None:
    async with (bench_on(start_gateway, settings, database_url, mock_port) as on,
                bench_on(start_gateway, settings, database_url, mock_port, resumable=False) as off_gateway):
        on.seconds = 0.2
        await on.make_chats(64)
        off = on.beside((off_gateway.gateway.port, off_gateway.pid))
        result = await on.saturation_beside(off, 2)
    assert len(result["rounds"]) == 2
    assert all(p[name]["streams"] > 0 and p[name]["errors"] == 0 for p in result["rounds"] for name in ("on", "off"))
    assert list(result["rounds"][1]) == ["off", "on"]  # the second round starts with the other gateway
    ratios = [p["on"]["streams_per_s"] / p["off"]["streams_per_s"] for p in result["rounds"]]
    assert result["ratio"] == pytest.approx(sum(ratios) / 2)
    assert result["on_cpu_ms_per_stream"] > 0 and result["off_cpu_ms_per_stream"] > 0  # this process's, here


@pytest.mark.parametrize("resumable", [True, False])
async def test_the_relay_counts_the_flushes_of_kept_events(
    start_gateway: Starter, settings: Settings, database_url: str, mock_port: int, resumable: bool,
) -> None:
    # 5 streams started together at 10 tokens/s: kept, their events go to Redis in about 10 flushes a second
    # (one per burst of tokens), never more than one every 10 ms; not kept, nothing goes in a second.
    async with counting_proxy(settings.redis_url or "") as proxy:
        async with bench_on(start_gateway, settings, database_url, mock_port, redis_url=proxy.url,
                            resumable=resumable) as bench:
            bench.seconds = 1.0
            result = await bench.redis_round_trips(5, proxy.tally)
    assert (result["opened"], result["stalled"]) == (5, 0)
    assert result["window_s"] >= 0.95 and result["redis_connections"] >= 1 and result["worker_cpu_share"] >= 0
    if resumable:
        assert 5 <= result["round_trips_per_s"] <= 100 and result["kib_per_s"] > 0
    else:
        assert result["round_trips_per_s"] < 3


async def test_a_resume_on_another_instance_is_timed_to_its_first_replayed_event(
    start_gateway: Starter, settings: Settings, database_url: str, mock_port: int,
) -> None:
    async with (bench_on(start_gateway, settings, database_url, mock_port) as live,
                bench_on(start_gateway, settings, database_url, mock_port) as other):
        result = await live.resume_latency(live.beside((other.gateway.port, other.pid)), 2, 6)
    assert (result["samples"], result["errors"], result["live_turns"]) == (6, 0, 2)
    assert 0 < result["p50_ms"] <= result["p99_ms"]
    assert 0 < result["health_p50_ms"] <= result["health_p99_ms"]
