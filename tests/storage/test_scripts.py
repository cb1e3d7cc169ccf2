"""The quota scripts' own Redis connection, against the run's real Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError, ResponseError

from storage.scripts import Script, ScriptClient, command, parse_reply

# Its keys expire: the suite may run against a shared Redis, which it leaves as it found it.
ECHO = Script("return {ARGV[1], tonumber(ARGV[2]), redis.call('SET', KEYS[1], ARGV[1], 'EX', 600), false}")
FAILS = Script("return redis.error_reply('NOPE ' .. ARGV[1])")


@pytest.fixture
async def client(redis: Redis) -> AsyncIterator[ScriptClient]:
    scripts = ScriptClient.like(redis)
    yield scripts
    await scripts.aclose()


async def test_replies_come_back_typed_and_to_their_own_callers(client: ScriptClient, redis: Redis) -> None:
    key = f"test-scripts:{uuid.uuid4().hex}"
    replies = await asyncio.gather(*(client.run(ECHO, [key], [f"v{n}", n]) for n in range(300)))
    assert replies == [[f"v{n}".encode(), n, b"OK", None] for n in range(300)]
    assert await redis.get(key) == b"v299"  # one connection: the calls ran in the order they were made


async def test_an_error_reply_is_raised_and_the_connection_goes_on(client: ScriptClient) -> None:
    with pytest.raises(ResponseError, match="NOPE first"):
        await client.run(FAILS, [], ["first"])
    assert (await client.run(ECHO, [f"test-scripts:{uuid.uuid4().hex}"], ["after", 1]))[0] == b"after"


async def test_a_server_that_lost_its_scripts_is_sent_them_again(client: ScriptClient, redis: Redis) -> None:
    key = f"test-scripts:{uuid.uuid4().hex}"
    assert (await client.run(ECHO, [key], ["once", 1]))[0] == b"once"
    await redis.script_flush()
    assert (await client.run(ECHO, [key], ["again", 2]))[:2] == [b"again", 2]


async def test_a_lost_connection_fails_its_calls_and_the_next_one_reconnects(
    client: ScriptClient, redis: Redis
) -> None:
    key = f"test-scripts:{uuid.uuid4().hex}"
    await client.run(ECHO, [key], ["before", 1])
    connection = client._connection
    assert connection is not None
    client_id = await connection.send(command("CLIENT", "ID"))
    in_flight = asyncio.get_running_loop().create_future()
    connection.pending.append(in_flight)  # a call whose reply has not come when the server drops it
    assert await redis.client_kill_filter(_id=client_id) == 1
    with pytest.raises(ConnectionError):
        await in_flight
    assert (await client.run(ECHO, [key], ["after", 2]))[0] == b"after"
    assert client._connection is not connection


async def test_a_client_is_made_like_its_redis_py_client_down_to_the_database(
    redis_url: str, redis: Redis
) -> None:
    other_db = Redis.from_url(redis_url)
    other_db.connection_pool.connection_kwargs["db"] = 5
    scripts = ScriptClient.like(other_db)
    key = f"test-scripts:{uuid.uuid4().hex}"
    try:
        await scripts.run(ECHO, [key], ["in db 5", 1])
        assert await other_db.get(key) == b"in db 5"
        assert redis.connection_pool.connection_kwargs.get("db", 0) != 5
        assert await redis.get(key) is None
    finally:
        await scripts.aclose()
        await other_db.aclose()


def test_replies_split_anywhere_are_read_once_whole() -> None:
    reply = b"*4\r\n$5\r\nhello\r\n:-12\r\n*2\r\n+OK\r\n$-1\r\n-ERR bad\r\n"
    for cut in range(len(reply)):
        assert parse_reply(reply[:cut], 0) is None, cut
    value, end = parse_reply(reply, 0)  # type: ignore[misc]
    assert end == len(reply)
    assert value[:3] == [b"hello", -12, [b"OK", None]]
    assert isinstance(value[3], ResponseError) and str(value[3]) == "ERR bad"
