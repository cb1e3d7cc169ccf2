"""A mock OpenAI-format streaming upstream for benchmarks, on raw asyncio (so it is never the bottleneck).

The model name sets the stream: ``mock:tokens=64&gap_ms=0&ttft_ms=0&hold_ms=0`` sends ``tokens`` deltas,
``gap_ms`` apart, after ``ttft_ms``; ``hold_ms`` keeps the stream open after the last delta. HTTP/1.1
requests get a chunked, keep-alive answer (as an SDK expects); HTTP/1.0 ones an answer closed at its end.
Streams cut short by the client are recorded with the time their connection closed. With a TLS context
it serves https (``throwaway_tls`` makes one, with a certificate the gateway under test is told to trust).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from urllib.parse import parse_qsl

import orjson
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"


@lru_cache(maxsize=64)
def frames_for(model: str) -> tuple[bytes, tuple[bytes, ...], bytes, dict[str, float]]:
    """The role frame, one frame per delta and the closing frames for ``model``, built once."""
    params = {k: float(v) for k, v in parse_qsl(model.partition(":")[2])}  # a model id holds no "?"
    head = orjson.dumps({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0,
                         "model": model})[:-1]

    def frame(delta: bytes, finish: bytes = b"null") -> bytes:
        return b"data: " + head + b',"choices":[{"index":0,"delta":' + delta + b',"finish_reason":' + finish + b"}]}\n\n"

    tokens = int(params.get("tokens", 64))
    deltas = tuple(frame(b'{"content":' + orjson.dumps(f"tok{n} ") + b"}") for n in range(tokens))
    usage = orjson.dumps({"prompt_tokens": 10, "completion_tokens": tokens, "total_tokens": 10 + tokens})
    tail = frame(b"{}", b'"stop"') + b"data: " + head + b',"choices":[],"usage":' + usage + b"}\n\ndata: [DONE]\n\n"
    return frame(b'{"role":"assistant","content":""}'), deltas, tail, params


class MockUpstream(asyncio.Protocol):
    aborted: list[float] = []  # when each stream cut short by its client lost its connection

    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.streaming = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        head, sep, rest = self.buffer.partition(b"\r\n\r\n")
        if not sep:
            return
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(rest) < length:
            return
        self.buffer = rest[length:]
        body = orjson.loads(rest[:length] or b"{}")
        http10 = head.split(b"\r\n", 1)[0].endswith(b"HTTP/1.0")
        self.task = asyncio.get_running_loop().create_task(self.respond(str(body.get("model", "mock")), http10))

    async def respond(self, model: str, http10: bool) -> None:
        role, deltas, tail, params = frames_for(model)
        transport = self.transport
        assert transport is not None
        write = transport.write if http10 else self._chunk
        transport.write(_HEAD + (b"connection: close\r\n\r\n" if http10 else b"transfer-encoding: chunked\r\n\r\n"))
        self.streaming = True
        if params.get("ttft_ms"):
            await asyncio.sleep(params["ttft_ms"] / 1000)
        write(role)
        gap = params.get("gap_ms", 0) / 1000
        if gap:
            # Paced: each delta is written by a timer callback, with no task step or future per token, so
            # thousands of paced streams cost the harness little.
            done = asyncio.get_running_loop().create_future()
            self._pace(write, iter(deltas), gap, done)
            if not await done:
                return
        else:
            for delta in deltas:
                if transport.is_closing():
                    return
                write(delta)
        if params.get("hold_ms"):
            await asyncio.sleep(params["hold_ms"] / 1000)
        write(tail)
        self.streaming = False
        if http10:
            transport.close()
        else:
            transport.write(b"0\r\n\r\n")

    def _pace(self, write: Callable[[bytes], None], deltas: Iterator[bytes], gap: float,
              done: asyncio.Future[bool]) -> None:
        """Write the next delta now and schedule the one after; ``done`` says whether all were written."""
        if done.done():
            return
        assert self.transport is not None
        if self.transport.is_closing():
            done.set_result(False)
            return
        delta = next(deltas, None)
        if delta is None:
            done.set_result(True)
            return
        write(delta)
        asyncio.get_running_loop().call_later(gap, self._pace, write, deltas, gap, done)

    def _chunk(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"%x\r\n%s\r\n" % (len(data), data))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.streaming:
            MockUpstream.aborted.append(time.monotonic())
        if self.task is not None and not self.task.done():
            self.task.cancel()


async def start_mock(host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None) -> asyncio.Server:
    return await asyncio.get_running_loop().create_server(MockUpstream, host, port, backlog=8192, ssl=tls)


def throwaway_certificate(folder: Path, hosts: tuple[str, ...] = ("127.0.0.1",)) -> tuple[Path, Path]:
    """A self-signed certificate for ``hosts`` (names or IP addresses), made now and valid for a day, and its
    key: their files in ``folder`` (a client trusts the certificate through ``SSL_CERT_FILE``)."""
    key = ec.generate_private_key(ec.SECP256R1())  # P-256, as most vendors' certificates are
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "upstream.pem", folder / "upstream.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def throwaway_tls(folder: Path) -> tuple[ssl.SSLContext, Path]:
    """A server context for 127.0.0.1 behind a ``throwaway_certificate``, and the certificate's file."""
    cert_file, key_file = throwaway_certificate(folder)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context, cert_file
