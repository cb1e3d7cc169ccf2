"""Egress through a proxy: each vendor's fake behind TLS, reached through a local CONNECT proxy named by
``HTTPS_PROXY`` (with credentials), bypassed by ``NO_PROXY``; a plain http vendor through ``HTTP_PROXY``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bench.mock_upstream import throwaway_certificate
from providers.base import ProviderConnectionError
from providers.proxy import proxy_for
from tests.providers.test_adapters import adapter_for, run
from tests.servers import pipe, serve_app
from tests.vendors import TEXT, VENDORS, VendorServer


@dataclass
class ForwardProxy:
    """A proxy that tunnels ``CONNECT host:port`` and forwards absolute-form requests; it records each
    request line and the ``Proxy-Authorization`` it came with."""

    requests: list[tuple[str, str | None]] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        line, *headers = head.decode("latin-1").split("\r\n")
        auth = next((h.split(":", 1)[1].strip() for h in headers if h.lower().startswith("proxy-authorization:")),
                    None)
        self.requests.append((line, auth))
        method, target, _ = line.split(" ", 2)
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            authority = target.split("/", 3)[2]
            host, _, port = authority.partition(":")
            up_reader, up_writer = await asyncio.open_connection(host, int(port or 80))
            up_writer.write(head)
        self.writers += [writer, up_writer]
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@contextlib.asynccontextmanager
async def forward_proxy() -> AsyncIterator[tuple[ForwardProxy, int]]:
    proxy = ForwardProxy()
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    try:
        yield proxy, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in proxy.writers:  # tunnels left open would hold the vendors' shutdown
            writer.transport.abort()


@pytest.fixture
async def tls_vendors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[dict[str, str]]:
    """Each vendor's fake served over https with a throwaway certificate the adapters are told to trust
    (``SSL_CERT_FILE``, read when an adapter opens its first TLS connection)."""
    cert, key = throwaway_certificate(tmp_path, ("localhost", "127.0.0.1"))
    cert_file, key_file = str(cert), str(key)
    monkeypatch.setenv("SSL_CERT_FILE", cert_file)
    async with contextlib.AsyncExitStack() as stack:
        urls = {vendor: await stack.enter_async_context(serve_app(VendorServer(vendor), tls=(cert_file, key_file)))
                for vendor in VENDORS}
        yield {vendor: url.replace("127.0.0.1", "localhost") for vendor, url in urls.items()}


def text_of(events: list[object]) -> str:
    return "".join(event for event in events if isinstance(event, str))


@pytest.mark.parametrize("vendor", VENDORS)
async def test_a_tls_vendor_is_reached_through_a_connect_tunnel_with_credentials(
    tls_vendors: dict[str, str], monkeypatch: pytest.MonkeyPatch, vendor: str
) -> None:
    async with forward_proxy() as (proxy, port):
        monkeypatch.setenv("HTTPS_PROXY", f"http://egress:s%40cret@127.0.0.1:{port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        events, error = await run(adapter_for(vendor, tls_vendors[vendor]), "normal")
    assert error is None and text_of(events) == TEXT
    vendor_port = tls_vendors[vendor].rpartition(":")[2]
    assert proxy.requests == [(f"CONNECT localhost:{vendor_port} HTTP/1.1", "Basic ZWdyZXNzOnNAY3JldA==")]


async def test_no_proxy_bypasses_the_proxy(tls_vendors: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    async with forward_proxy() as (proxy, port):
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("NO_PROXY", "example.org,localhost")
        events, error = await run(adapter_for("openai", tls_vendors["openai"]), "normal")
    assert error is None and text_of(events) == TEXT
    assert proxy.requests == []


async def test_a_plain_http_vendor_goes_through_http_proxy_in_absolute_form(
    vendors: dict[str, tuple[VendorServer, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = vendors["anthropic"][1].replace("127.0.0.1", "localhost")
    async with forward_proxy() as (proxy, port):
        monkeypatch.setenv("HTTP_PROXY", f"http://user:pw@127.0.0.1:{port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        events, error = await run(adapter_for("anthropic", url), "normal")
    assert error is None and text_of(events) == TEXT
    assert proxy.requests == [(f"POST {url}/v1/messages HTTP/1.1", "Basic dXNlcjpwdw==")]


async def test_a_proxy_that_refuses_the_tunnel_is_a_connection_failure(
    tls_vendors: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    try:
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        events, error = await run(adapter_for("gemini", tls_vendors["gemini"]), "normal")
    finally:
        server.close()
    assert events == [] and isinstance(error, ProviderConnectionError)


def test_the_environment_names_the_proxy_as_curl_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", ".corp.example,10.0.0.1")
    assert proxy_for("https", "api.openai.com") is not None
    assert proxy_for("https", "llm.corp.example") is None
    assert proxy_for("https", "10.0.0.1") is None
    assert proxy_for("http", "api.openai.com") is None  # HTTP_PROXY unset
