"""The relay the bench puts in front of Redis to count a gateway's round trips from outside it."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from redis.asyncio import Redis

from bench.redis_proxy import Tally, counting_proxy, proxied_url
from storage.scripts import command


async def test_the_relay_counts_each_burst_once_however_many_commands_it_holds(redis_url: str) -> None:
    async with counting_proxy(redis_url) as proxy:
        relay = urlsplit(proxy.url)
        reader, writer = await asyncio.open_connection(relay.hostname, relay.port)
        try:
            one, pipeline = command("PING"), command("PING") * 10
            writer.write(one)
            assert await reader.readexactly(7) == b"+PONG\r\n"
            writer.write(pipeline)
            assert await reader.readexactly(70) == b"+PONG\r\n" * 10
        finally:
            writer.close()
        assert (proxy.tally.reads, proxy.tally.bytes, proxy.tally.connections) == (2, len(one + pipeline), 1)


async def test_a_client_through_the_relay_reaches_the_real_redis(redis_url: str, redis: Redis) -> None:
    async with counting_proxy(redis_url) as proxy:
        relayed = Redis.from_url(proxy.url)
        try:
            await relayed.set("bench-relay-test", b"through", ex=10)
            assert await redis.get("bench-relay-test") == b"through"
        finally:
            await relayed.aclose()
        assert proxy.tally.reads >= 1


def test_the_relayed_url_keeps_the_credentials_and_the_database() -> None:
    assert proxied_url("redis://:secret@redis.internal:6380/3", 4321) == "redis://:secret@127.0.0.1:4321/3"
    assert proxied_url("redis://127.0.0.1:6379/0", 4321) == "redis://127.0.0.1:4321/0"


def test_the_rates_are_what_came_since_the_earlier_tally() -> None:
    later = Tally(reads=30, bytes=6144, connections=4)
    assert later.rates(Tally(reads=10, bytes=2048), 2.0) == {"round_trips_per_s": 10.0, "kib_per_s": 2.0}
