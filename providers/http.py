"""The HTTP client the vendor adapters stream through: one aiohttp connection pool per adapter.

Each vendor's SDK still decides what a request looks like (base URL, key, the headers it sends, see
``sdk_headers``); the bytes go through here. Measured client-side on one core, 64-delta streams from a
local mock (docs/performance.md): 820-830 streams/s through the SDK's ``client.post`` on the SDK's own
aiohttp transport, 1,550-2,160 on aiohttp directly, and 1.3 ms against 0.9 ms for one stream alone.

Errors leave as our own: a status of 400 or more as ``status_failure`` (the vendor's text left out), a
read stalled past the idle timeout as ``ProviderTimeout``, anything else on the wire as
``ProviderConnectionError``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import orjson

from providers.base import (
    ProviderConnectionError,
    ProviderTimeout,
    StreamBatch,
    UpstreamConfig,
    status_failure,
)
from providers.sse import StreamReader, read_batches


def sdk_headers(client: Any) -> dict[str, str]:
    """The headers an official SDK client sends on every request: its identity, version pins and key."""
    headers = {**client.default_headers, **client.auth_headers}
    return {name: value for name, value in headers.items() if isinstance(value, str)}


def json_or_none(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


class Upstream:
    """A vendor's connection pool: ``stream`` posts a JSON body and yields the answer's event batches."""

    def __init__(self, vendor: str, config: UpstreamConfig) -> None:
        self.vendor = vendor
        self.config = config
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        # Built on first use: a session belongs to the event loop that runs it.
        if self._session is None:
            config = self.config
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=config.max_connections, limit_per_host=0),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout_s,
                                              sock_read=config.idle_timeout_s),
                auto_decompress=False, skip_auto_headers=("Accept-Encoding",),
            )
        return self._session

    async def stream(
        self, url: str, body: bytes, headers: Mapping[str, str], reader: StreamReader
    ) -> AsyncIterator[StreamBatch]:
        response = await self.open(url, body, headers)
        try:
            async for batch in read_batches(self.chunks(response), reader):
                yield batch
        finally:
            # Back to the pool only when read to its end; an abandoned stream closes its connection.
            if response.content.is_eof():
                response.release()
            else:
                response.close()

    async def open(self, url: str, body: bytes, headers: Mapping[str, str]) -> aiohttp.ClientResponse:
        try:
            response = await self.session().post(url, data=body, headers=headers)
            if response.status < 400:
                return response
            try:
                payload = await response.read()
            finally:
                response.release()
        except TimeoutError:
            raise ProviderTimeout(f"{self.vendor} timed out") from None
        except aiohttp.ClientError:
            raise ProviderConnectionError(f"The connection to {self.vendor} failed") from None
        raise status_failure(self.vendor, response.status, json_or_none(payload), response.headers)

    async def chunks(self, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        try:
            async for chunk in response.content.iter_any():
                yield chunk
        except TimeoutError:
            raise ProviderTimeout(f"{self.vendor} timed out") from None
        except aiohttp.ClientError:
            raise ProviderConnectionError(f"The connection to {self.vendor} failed") from None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
