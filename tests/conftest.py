"""Test services: a fresh PostgreSQL database and Redis key prefix per run, and real gateways over HTTP,
all on uvloop.

``GATEWAY_TEST_DATABASE_URL`` / ``GATEWAY_TEST_REDIS_URL`` name servers to use; when unset, embedded ones
start. A service that cannot be reached fails the run: nothing is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import uvloop
from redis.asyncio import Redis
from starlette.applications import Starlette

from gateway.app import create_app
from gateway.edge.auth import mint_token
from gateway.embedded import embedded_postgres, embedded_redis
from gateway.services import Services
from gateway.settings import Settings
from providers.fake import FakeProvider
from providers.registry import ProviderRegistry
from storage.db import Pool
from tests.servers import serve_app
from tests.vendors import VENDORS, VendorServer

JWT_SECRET = "test-secret-" + "x" * 32


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every test runs on uvloop, the loop ``gateway serve`` runs on: its transports are not asyncio's (a bug
    that only uvloop showed once reached the benchmark, not the tests)."""
    return {"uvloop": uvloop.new_event_loop}


def database_named(url: str, name: str) -> str:
    return urllib.parse.urlsplit(url)._replace(path="/" + name).geturl()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("streamgate")


@pytest.fixture(scope="session")
def server_database_url(data_dir: Path) -> Iterator[str]:
    url = os.environ.get("GATEWAY_TEST_DATABASE_URL")
    if url:
        yield url
        return
    with embedded_postgres(data_dir / "postgres") as embedded:
        yield embedded


@pytest.fixture(scope="session")
async def database_url(server_database_url: str) -> AsyncIterator[str]:
    """A database created for this run on the test server, dropped at the end."""
    name = f"sg_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield database_named(server_database_url, name)
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="session")
def redis_url(data_dir: Path) -> Iterator[str]:
    url = os.environ.get("GATEWAY_TEST_REDIS_URL")
    if url:
        yield url
        return
    with embedded_redis(data_dir / "redis") as embedded:
        yield embedded


@pytest.fixture(scope="session")
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    await client.ping()
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
async def settings(
    database_url: str, redis_url: str, redis: Redis, data_dir: Path
) -> AsyncIterator[Settings]:
    prefix = f"sgtest-{uuid.uuid4().hex[:8]}:"
    yield Settings(
        database_url=database_url,
        redis_url=redis_url,
        redis_prefix=prefix,
        jwt_secret=JWT_SECRET,
        data_dir=data_dir,
        checkpoint_s=0.2,
    )
    keys = [key async for key in redis.scan_iter(match=f"{prefix}*")]
    if keys:
        await redis.delete(*keys)


@pytest.fixture(scope="session")
async def db(settings: Settings) -> AsyncIterator[Pool]:
    """A pool on the run's database, for checking what the gateway stored."""
    from storage.db import create_pool
    from storage.migrations import migrate

    assert settings.database_url
    await migrate(settings.database_url)
    pool = await create_pool(settings.database_url, 1, 4)
    yield pool
    await pool.close()


@dataclass
class Gateway:
    """An in-process gateway under a real uvicorn: its URL, and its app for looking inside."""

    url: str
    app: Starlette

    @property
    def services(self) -> Services:
        services: Services = self.app.state.services
        return services

    @property
    def fake(self) -> FakeProvider:
        fake = self.app.state.providers.get("fake")
        assert isinstance(fake, FakeProvider)
        return fake


@pytest.fixture(scope="session")
def start_gateway(settings: Settings) -> Callable[..., contextlib.AbstractAsyncContextManager[Gateway]]:
    """Start an in-process gateway with some settings changed."""

    @contextlib.asynccontextmanager
    async def start(providers: ProviderRegistry | None = None, **overrides: Any) -> AsyncIterator[Gateway]:
        app = create_app(settings.model_copy(update=overrides), providers)
        async with serve_app(app) as url:
            yield Gateway(url, app)

    return start


@pytest.fixture(scope="session")
async def gateway(start_gateway: Callable[..., Any], db: Pool) -> AsyncIterator[Gateway]:
    async with start_gateway() as started:
        yield started


@pytest.fixture(scope="session")
def gateway_url(gateway: Gateway) -> str:
    return gateway.url


@pytest.fixture(scope="session")
async def vendors() -> AsyncIterator[dict[str, tuple[VendorServer, str]]]:
    """A fake server of each vendor (see tests/vendors.py), by vendor name: the server and its URL."""
    async with contextlib.AsyncExitStack() as stack:
        servers = {}
        for vendor in VENDORS:
            server = VendorServer(vendor)
            servers[vendor] = (server, await stack.enter_async_context(serve_app(server)))
        yield servers


@pytest.fixture
async def client(gateway_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway_url, timeout=30) as http:
        yield http


def auth_headers(user: str, org: str, role: str | None = None, ttl: int = 3600) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(JWT_SECRET, user, org, role, ttl)}"}


@pytest.fixture
def alice() -> dict[str, str]:
    """A fresh user in a fresh org for each test, so tests never see each other's data."""
    return auth_headers(f"alice-{uuid.uuid4().hex[:8]}", f"org-{uuid.uuid4().hex[:8]}")
