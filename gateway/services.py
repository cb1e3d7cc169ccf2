"""The process-wide services the routes use, opened in the lifespan and closed on shutdown."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
from redis.asyncio import Redis
from starlette.requests import Request

from gateway.quotas import QuotaGuard
from gateway.settings import Settings
from gateway.streams import StreamRegistry
from providers.registry import ProviderRegistry


@dataclass(slots=True)
class Services:
    settings: Settings
    pool: asyncpg.Pool
    redis: Redis
    providers: ProviderRegistry
    streams: StreamRegistry
    quotas: QuotaGuard


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services
