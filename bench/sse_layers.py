"""The SSE layer alone: sse-starlette's EventSourceResponse against the gateway's EventStream.

Both serve the same 64 deltas from an async generator under uvicorn (one worker, CPU 0): sse-starlette as
pre-encoded frames, ours as a turn relayed through the chat events' codec. The load generator (CPU 1)
keeps 64 streams going. Run: .venv/bin/python bench/sse_layers.py
"""

from __future__ import annotations

import asyncio
import functools
import os
import sys
import tempfile
from pathlib import Path

from bench.harness import until_ready
from bench.loadtest import Target, closed_loop, print_summary, request_bytes

APP = '''
import uuid

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from gateway.streaming.sse import ChatEvents, EventStream
from gateway.streaming.turns import Turn, TurnIds
from providers.base import Finish, ProviderRequest, Pump

FRAMES = [b"id: %d\\nevent: delta\\ndata: {\\"text\\":\\"tok%d \\"}\\n\\n" % (n, n) for n in range(64)]

async def frames():
    for frame in FRAMES:
        yield frame

async def library(request):
    return EventSourceResponse(frames(), send_timeout=30, ping=15)

async def batches():
    for n in range(64):
        yield ["tok%d " % n]
    yield [Finish("stop")]

async def stored(turn):
    pass

async def own(request):
    turn = Turn("bench", ProviderRequest("bench", []), Pump(batches()), stored,
                TurnIds(uuid.uuid4(), uuid.uuid4(), uuid.uuid4()))
    return EventStream(turn, ChatEvents(), {}, 15, 30)

async def ready(request):
    return PlainTextResponse("ok")

app = Starlette(routes=[Route("/library", library, methods=["POST"]), Route("/own", own, methods=["POST"]),
                        Route("/ready", ready)])
'''


def same_request(request: bytes, worker: int) -> bytes:
    return request


async def main() -> None:
    os.sched_setaffinity(0, {1})
    app = Path(tempfile.mkdtemp()) / "sse_layers_app.py"
    app.write_text(APP)
    server = await asyncio.create_subprocess_exec(
        "taskset", "-c", "0", sys.executable, "-m", "uvicorn", "--app-dir", str(app.parent), "sse_layers_app:app",
        "--port", "18777", "--no-access-log", "--log-level", "warning", "--loop", "uvloop", "--http", "httptools",
        env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        await until_ready(18777)
        target = Target("127.0.0.1", 18777, "/", {})
        for _ in range(2):
            for path in ("/library", "/own"):
                report = await closed_loop(64, 5, functools.partial(same_request, request_bytes(target, path, {})),
                                           target)
                print_summary(path, report.summary())
    finally:
        server.terminate()
        await server.wait()


asyncio.run(main())
