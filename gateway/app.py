"""The Starlette application and its lifespan, the providers it is built with, and under ``gateway serve
--workers N`` each worker's number (``worker_settings``)."""

from __future__ import annotations

import fcntl
import functools
import gc
import logging
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.types import Receive, Scope, Send

from gateway.api import chats, compat, files, health, openapi, page, resume, send, shared, ui_stream, usage
from gateway.edge import metrics
from gateway.edge.auth import JWTBackend, on_auth_error
from gateway.edge.errors import EXCEPTION_HANDLERS
from gateway.edge.logs import configure_logging
from gateway.edge.middleware import BODY_SEND, RESPONSE_REST, RequestContextMiddleware
from gateway.embedded import resolve_jwt_secret
from gateway.services import Services
from gateway.settings import WORKER_NUMBERS, Settings, load_settings
from gateway.streaming.admission import QuotaGuard
from gateway.streaming.registry import StreamRegistry
from gateway.streaming.titles import TitleModel, TitleWriter
from providers.base import ANTHROPIC_MODELS, GEMINI_MODELS, OPENAI_MODELS, Provider, UpstreamConfig
from providers.fake import FakeProvider
from providers.registry import LazyProvider, ProviderRegistry
from storage.db import Pool, create_pool
from storage.migrations import migrate
from storage.quotas import QuotaDefaults, QuotaStore
from storage.usage import QuotaOverride, get_override

logger = logging.getLogger("gateway.app")


class Gateway(Starlette):
    """The Starlette app, with two ways past its middleware stack for long streams:

    - the server's own ``send`` in the scope (``BODY_SEND``): a stream writes its body frames there, below
      every wrapper of the stack, Starlette's outermost included;
    - the rest of a response (``RESPONSE_REST``): a stream that has started leaves it there and returns,
      the stack unwinds, and the rest runs here, in the same task.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        scope[BODY_SEND] = send
        scope[RESPONSE_REST] = None
        try:
            await super().__call__(scope, receive, send)
            rest = scope[RESPONSE_REST]
            if rest is not None:
                await rest(receive)
        finally:
            # The server's send is a method of the request's cycle, which holds the scope: dropped here,
            # a request's objects are freed when it ends instead of waiting for a full garbage collection.
            del scope[BODY_SEND], scope[RESPONSE_REST]


def create_app(settings: Settings | None = None, providers: ProviderRegistry | None = None) -> Starlette:
    settings = worker_settings(settings or load_settings())
    configure_logging(settings.log_level, settings.log_format)
    if not settings.database_url or not settings.redis_url:
        raise RuntimeError(
            "GATEWAY_DATABASE_URL and GATEWAY_REDIS_URL must be set (`gateway serve` sets them)"
        )

    providers = providers or build_providers(settings)
    title_model = TitleModel.resolve(providers, settings.title_model) if settings.title_model else None

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        assert settings.database_url and settings.redis_url
        if settings.preload_providers:
            providers.preload()  # before serving: an import on the event loop would stall every stream
        await migrate(settings.database_url)
        pool = await create_pool(settings.database_url, settings.db_pool_min, settings.db_pool_max)
        redis = Redis.from_url(settings.redis_url, max_connections=settings.redis_max_connections)
        quotas = QuotaGuard(quota_store(settings, pool, redis), settings.quota_fail_mode,
                            settings.quota_default_max_tokens)
        streams = StreamRegistry(settings, pool, redis, quotas, providers)
        titles = TitleWriter(title_model, streams) if title_model else None
        await streams.start()
        logger.info("worker serving", extra={"instance_id": streams.instance_id, "pid": os.getpid()})
        app.state.services = Services(settings, pool, redis, providers, streams, quotas, titles)
        gc.set_threshold(settings.gc_young_threshold, *gc.get_threshold()[1:])
        # What the worker built to serve (modules, routes, pools: about 75,000 objects) lives as long as it
        # does: frozen, it is left out of every full collection, which then walks only what came since (11 ms
        # less a pause for every stream of the worker; docs/performance.md).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await streams.close(settings.shutdown_grace_s + 5)
            if titles is not None:
                await titles.close()
            await providers.aclose()
            await quotas.store.aclose()
            await redis.aclose()
            await pool.close()

    middleware = [
        Middleware(RequestContextMiddleware),
        Middleware(
            AuthenticationMiddleware,
            backend=JWTBackend.from_settings(settings, resolve_jwt_secret(settings)),
            on_error=on_auth_error,
        ),
    ]
    app = Gateway(
        # The streaming routes first: a request walks the list until one matches.
        routes=[*send.routes, *compat.routes, *ui_stream.routes, *resume.routes, *health.routes, *metrics.routes, *chats.routes,
                *shared.routes, *usage.routes, *files.routes, *openapi.routes, *page.routes],
        middleware=middleware,
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.providers = providers
    return app


def worker_settings(settings: Settings) -> Settings:
    """A stable ``GATEWAY_INSTANCE_ID`` shared by the workers of one ``gateway serve --workers N`` becomes
    ``<id>.<n>``, n the worker's number: each worker's streams are its own (a starting worker takes the
    streams under its id for dead ones), and a worker restarted in a dead one's place takes its number, so
    reclaims its streams at once."""
    folder = os.environ.get(WORKER_NUMBERS)
    if not folder or not settings.instance_id:
        return settings
    numbers = Path(folder) / re.sub(r"[^A-Za-z0-9_.-]", "_", settings.instance_id)  # one set per instance id
    return settings.model_copy(update={"instance_id": f"{settings.instance_id}.{take_worker_number(numbers)}"})


_numbers_held: list[int] = []  # the locked files' descriptors: open as long as the process lives


def take_worker_number(folder: Path) -> int:
    """The lowest number no living process holds in ``folder``: a lock on ``<n>.lock`` that lasts as long as
    this process, freed by the system when it ends, however it ends."""
    folder.mkdir(parents=True, exist_ok=True)
    number = 0
    while True:
        fd = os.open(folder / f"{number}.lock", os.O_CREAT | os.O_RDONLY, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            number += 1
            continue
        _numbers_held.append(fd)
        return number


def quota_store(settings: Settings, pool: Pool, redis: Redis) -> QuotaStore:
    defaults = QuotaDefaults(
        settings.quota_user_tokens, settings.quota_org_tokens, settings.quota_period,
        settings.quota_requests_per_minute, settings.quota_max_concurrent_streams,
        settings.quota_org_requests_per_minute,
    )

    async def load_limits(org_id: str, scope: str, subject_id: str) -> QuotaOverride | None:
        return await get_override(pool, org_id, scope, subject_id)

    return QuotaStore(redis, settings.redis_prefix, defaults, settings.stream_lease_s, load_limits,
                      settings.quota_limits_cache_s)


def build_providers(settings: Settings) -> ProviderRegistry:
    """The fake, the three vendors (usable once their key is set) and every configured endpoint.

    Vendor adapters load their SDK on first use (see LazyProvider)."""
    env = os.environ
    config = UpstreamConfig(settings.connect_timeout_s, settings.idle_timeout_s, settings.upstream_max_connections)

    def openai_kind(name: str, key: str | None, base_url: str | None, vendor: str, models: tuple[str, ...]) -> Provider:
        from providers.openai import OpenAIProvider

        return OpenAIProvider(name, key, base_url, config, vendor=vendor, models=models)

    def anthropic_adapter() -> Provider:
        from providers.anthropic import AnthropicProvider

        return AnthropicProvider(env.get("ANTHROPIC_API_KEY"), env.get("ANTHROPIC_BASE_URL"), config)

    def gemini_adapter() -> Provider:
        from providers.gemini import GeminiProvider

        return GeminiProvider(gemini_key, settings.gemini_base_url, config)

    gemini_key = env.get("GEMINI_API_KEY") or env.get("GOOGLE_API_KEY")
    openai_key = env.get("OPENAI_API_KEY")
    providers: list[Provider] = [FakeProvider()] if settings.fake_provider else []
    providers += [
        LazyProvider("openai", OPENAI_MODELS, bool(openai_key),
                     lambda: openai_kind("openai", openai_key, env.get("OPENAI_BASE_URL"), "OpenAI", OPENAI_MODELS)),
        LazyProvider("anthropic", ANTHROPIC_MODELS, bool(env.get("ANTHROPIC_API_KEY")), anthropic_adapter),
        LazyProvider("gemini", GEMINI_MODELS, bool(gemini_key), gemini_adapter),
    ]
    for name, endpoint in settings.providers.items():
        key = env.get(endpoint.api_key_env) if endpoint.api_key_env else None
        models = tuple(endpoint.models)
        providers.append(LazyProvider(
            name, models, key is not None or endpoint.api_key_env is None,  # some servers need no key
            functools.partial(openai_kind, name, key, endpoint.base_url, name, models),
        ))
    return ProviderRegistry(providers)
