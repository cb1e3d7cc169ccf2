"""The process-wide services the routes use, opened in the lifespan and closed on shutdown."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis
from starlette.requests import Request

from gateway.settings import Settings
from gateway.streaming.admission import QuotaGuard
from gateway.streaming.registry import StreamRegistry
from gateway.streaming.titles import TitleWriter
from providers.registry import ProviderRegistry
from storage.db import Pool


@dataclass(slots=True)
class Services:
    settings: Settings
    pool: Pool
    redis: Redis
    providers: ProviderRegistry
    streams: StreamRegistry
    quotas: QuotaGuard
    titles: TitleWriter | None = None  # with GATEWAY_TITLE_MODEL: a model titles each chat after its first message


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services
