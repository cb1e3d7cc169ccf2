"""Egress through a proxy: ``HTTPS_PROXY``, ``HTTP_PROXY`` and ``NO_PROXY``, as curl and requests read them.

An https vendor is reached through a ``CONNECT`` tunnel, TLS running end to end inside it; a plain http
vendor by sending the request to the proxy with its absolute URL. Credentials in the proxy's URL
(``http://user:secret@proxy:3128``) go as ``Proxy-Authorization: Basic``. Each adapter's pool reads the
environment once per vendor host (providers/http.py ``Upstream.route``): set it before the gateway starts.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import cast

# The most a proxy's answer to CONNECT may hold before its blank line.
MAX_HANDSHAKE_BYTES = 16 << 10


class ProxyRefused(OSError):
    """The proxy answered CONNECT with something other than a 2xx (or not HTTP at all)."""


@dataclass(frozen=True, slots=True)
class Proxy:
    host: str
    port: int
    authorization: str | None  # the Proxy-Authorization header's value, from the URL's credentials


def proxy_for(scheme: str, host: str) -> Proxy | None:
    """The proxy the environment names for ``scheme`` (http or https) to ``host``; None when ``NO_PROXY``
    covers the host or no proxy is set."""
    proxies = urllib.request.getproxies_environment()
    url = proxies.get(scheme)
    # proxy_bypass_environment applies NO_PROXY as curl does (suffixes, ports, "*"); typeshed lacks it.
    if not url or urllib.request.proxy_bypass_environment(host, proxies):  # type: ignore[attr-defined]
        return None
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if not parts.hostname:
        return None
    authorization = None
    if parts.username is not None:
        user, secret = urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or "")
        authorization = "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()
    return Proxy(parts.hostname, parts.port or 80, authorization)


class _Handshake(asyncio.Protocol):
    """Reads the proxy's answer to CONNECT, up to its blank line."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.answer = bytearray()
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.answer += data
        if b"\r\n\r\n" in self.answer and not self.done.done():
            self.done.set_result(bytes(self.answer))
        elif len(self.answer) > MAX_HANDSHAKE_BYTES and not self.done.done():
            self.done.set_exception(ProxyRefused("The proxy's answer to CONNECT is too long"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ProxyRefused("The proxy closed the connection during CONNECT"))


async def tunnel(
    proxy: Proxy, host: str, port: int, tls: ssl.SSLContext | None, protocol: asyncio.Protocol
) -> asyncio.Transport:
    """A connection to ``host:port`` through ``proxy``'s CONNECT tunnel, TLS started inside it when
    ``tls`` is given, handed to ``protocol``. Raises OSError (ProxyRefused) when the proxy refuses."""
    loop = asyncio.get_running_loop()
    transport, handshake = await loop.create_connection(_Handshake, proxy.host, proxy.port)
    try:
        target = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
        if proxy.authorization:
            lines.append(f"Proxy-Authorization: {proxy.authorization}")
        transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        status = (await handshake.done).split(b"\r\n", 1)[0].split()
        if len(status) < 2 or not status[0].startswith(b"HTTP/") or not status[1].startswith(b"2"):
            raise ProxyRefused(f"The proxy refused the tunnel: {b' '.join(status[:3])!r}")
        if tls is not None:
            upgraded = await loop.start_tls(transport, handshake, tls, server_hostname=host)
            assert upgraded is not None
            transport = upgraded
    except BaseException:
        transport.abort()
        raise
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    return transport
