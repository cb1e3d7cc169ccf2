"""Real servers for black-box tests: in-process uvicorn on an ephemeral port, and gateway subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import uvicorn
from starlette.types import ASGIApp


class _Server(uvicorn.Server):
    """uvicorn's server, with an event set once it listens (no polling for readiness)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.should_exit:
            self.listening.set()

    def install_signal_handlers(self) -> None:  # the test process keeps its own handlers
        pass


@contextlib.asynccontextmanager
async def serve_app(app: ASGIApp, http: str = "auto", tls: tuple[str, str] | None = None) -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1 with a real uvicorn (``http``: its HTTP implementation) in this event
    loop; yield its base URL. With ``tls`` (a certificate file and its key file) it serves https."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, lifespan="on", log_config=None, access_log=False, timeout_graceful_shutdown=5, http=http,
        ssl_certfile=tls[0] if tls else None, ssl_keyfile=tls[1] if tls else None,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    listening = asyncio.create_task(server.listening.wait())
    await asyncio.wait([task, listening], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        listening.cancel()
        await task
        raise RuntimeError("the test server did not start")
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy ``reader`` to ``writer`` until either side ends (one direction of a test proxy)."""
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


_LISTENING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


@dataclass
class GatewayProcess:
    """A ``gateway serve`` subprocess; ``log`` keeps every line it wrote to stderr."""

    process: asyncio.subprocess.Process
    url: str = ""
    log: list[str] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None

    async def signal(self, signum: int) -> int:
        self.process.send_signal(signum)
        return await self.process.wait()

    async def wait_for_line(self, pattern: str, timeout: float = 30, count: int = 1) -> re.Match[str]:
        async def scan() -> re.Match[str]:
            regex = re.compile(pattern)
            seen, found = 0, 0
            while True:
                for line in self.log[seen:]:
                    if (match := regex.search(line)) and (found := found + 1) == count:
                        return match
                seen = len(self.log)
                await self._more.wait()
                self._more.clear()

        return await asyncio.wait_for(scan(), timeout)

    def __post_init__(self) -> None:
        self._more = asyncio.Event()

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            self.log.append(raw.decode(errors="replace"))
            self._more.set()
        self._more.set()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def gateway_process(env: dict[str, str], *args: str) -> AsyncIterator[GatewayProcess]:
    """Start ``gateway serve`` on a free port with ``env`` added; yield once it listens."""
    port = free_port() if "--workers" in args else 0  # with workers, uvicorn logs the port it was given
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--port",
        str(port),
        *args,
        env={**os.environ, **env},
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
    )
    gateway = GatewayProcess(process)
    gateway._reader = asyncio.create_task(gateway._read())
    try:
        match = await gateway.wait_for_line(_LISTENING.pattern, timeout=60)
        gateway.url = f"http://127.0.0.1:{port or match.group(1)}"
        if "--workers" in args:  # the parent binds; only a started worker accepts connections
            workers = int(args[args.index("--workers") + 1])
            await gateway.wait_for_line("Application startup complete", timeout=60, count=workers)
        yield gateway
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 20)
            except TimeoutError:
                process.kill()
                await process.wait()
        await gateway._reader
