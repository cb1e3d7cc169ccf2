"""The app as a whole: health and readiness, request ids, error envelopes, a worker's collector and preloads."""

from __future__ import annotations

import asyncio
import gc
import uuid

import httpx

from gateway.app import create_app
from gateway.settings import Endpoint, Settings
from providers.registry import LazyProvider
from storage.db import Pool
from tests.conftest import database_named
from tests.servers import serve_app


async def test_health_is_public(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_ready_reports_both_backends(client: httpx.AsyncClient) -> None:
    response = await client.get("/ready")
    assert response.status_code == 200
    assert response.json()["checks"] == {"postgres": "ok", "redis": "ok"}


async def test_request_id_is_echoed(client: httpx.AsyncClient) -> None:
    response = await client.get("/health", headers={"X-Request-ID": "trace-123"})
    assert response.headers["x-request-id"] == "trace-123"


async def test_request_id_is_generated(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert len(response.headers["x-request-id"]) == 32


async def test_unknown_path_gets_404_envelope(client: httpx.AsyncClient, alice: dict[str, str]) -> None:
    response = await client.get("/v1/nothing-here", headers={**alice, "X-Request-ID": "r-404"})
    assert response.status_code == 404
    assert response.json() == {
        "error": {"code": "not_found", "message": "Not Found", "status": 404, "request_id": "r-404"}
    }


async def test_wrong_method_gets_405_envelope(client: httpx.AsyncClient, alice: dict[str, str]) -> None:
    response = await client.put("/v1/chats", headers=alice)
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


async def test_ready_turns_503_when_postgres_is_gone(settings: Settings, db: Pool) -> None:
    name = f"sg_gone_{uuid.uuid4().hex[:8]}"
    await db.execute(f'CREATE DATABASE "{name}"')
    assert settings.database_url
    url = database_named(settings.database_url, name)

    async with serve_app(create_app(settings.model_copy(update={"database_url": url}))) as base:
        async with httpx.AsyncClient(base_url=base) as http:
            assert (await http.get("/ready")).status_code == 200
            await db.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            response = await http.get("/ready")
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "unavailable"
    assert "postgres" in error["message"]
    assert error["details"]["postgres"].startswith("error")
    assert error["details"]["redis"] == "ok"


async def test_the_suite_runs_on_the_servers_loop() -> None:
    # `gateway serve` runs on uvloop; the tests must too (see pytest_asyncio_loop_factories in conftest).
    assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")


async def test_a_started_worker_collects_its_young_objects_at_the_set_threshold(settings: Settings) -> None:
    before = gc.get_threshold()
    try:
        async with serve_app(create_app(settings.model_copy(update={"gc_young_threshold": 4321}))):
            assert gc.get_threshold() == (4321, *before[1:])
    finally:
        gc.set_threshold(*before)


async def test_a_started_worker_leaves_what_it_built_out_of_full_collections(settings: Settings) -> None:
    # The services live as long as the worker: frozen at startup, no collection walks them again.
    app = create_app(settings)
    try:
        async with serve_app(app):
            services = app.state.services
            assert gc.get_freeze_count() > 0
            assert not any(tracked is services for tracked in gc.get_objects())
    finally:
        gc.unfreeze()


async def test_vendors_with_credentials_load_before_serving_when_asked(settings: Settings) -> None:
    # A vendor's SDK otherwise loads on its first call, on the event loop. An endpoint that needs no key
    # has credentials; a vendor without them is never loaded ahead of a call.
    endpoints = {"local": Endpoint(base_url="http://127.0.0.1:9/v1", models=["m"])}
    for preload in (False, True):
        app = create_app(settings.model_copy(update={"providers": endpoints, "preload_providers": preload}))
        async with serve_app(app):
            adapters = [app.state.providers.get(name) for name in ("local", "openai", "anthropic", "gemini")]
        assert all(isinstance(adapter, LazyProvider) for adapter in adapters)
        assert [a.loaded for a in adapters] == [preload and a.has_credentials for a in adapters]
        assert adapters[0].loaded == preload
