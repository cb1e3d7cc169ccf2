"""Prometheus metrics. Updated once per stream (never per token); ``/metrics`` is public.

With several uvicorn workers, ``gateway serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder before
any worker starts, and each scrape sums every worker's files.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

ACTIVE_STREAMS = Gauge("streamgate_active_streams", "Streams running now", multiprocess_mode="livesum")
TIME_TO_FIRST_TOKEN = Histogram("streamgate_time_to_first_token_seconds", "From request to first token",
                                buckets=_SECONDS)
STREAM_DURATION = Histogram("streamgate_stream_duration_seconds", "From request to the stream's end",
                            buckets=_SECONDS)
TOKENS_OUT = Counter("streamgate_tokens_out_total", "Text deltas sent to clients")
STREAM_ENDINGS = Counter("streamgate_stream_endings_total", "Streams by how they ended", ["finish_reason"])
QUOTA_REFUSALS = Counter("streamgate_quota_refusals_total", "Streams refused by a quota", ["code"])
PROVIDER_ERRORS = Counter("streamgate_provider_errors_total", "Provider failures", ["code"])
BACKEND_SECONDS = Histogram("streamgate_backend_call_seconds", "PostgreSQL and Redis calls on the stream path",
                            ["backend", "call"], buckets=_LATENCY)


@contextmanager
def timed(backend: str, call: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        BACKEND_SECONDS.labels(backend, call).observe(time.perf_counter() - started)


async def metrics(request: Request) -> Response:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        body = generate_latest(registry)
    else:
        body = generate_latest()
    return Response(body, media_type=CONTENT_TYPE_LATEST)


routes = [Route("/metrics", metrics)]
