"""The SSE layer alone: sse-starlette's EventSourceResponse against the gateway's EventStream.

Both serve the same 64 deltas from an async generator under uvicorn (one worker, CPU 0): sse-starlette as
pre-encoded frames, ours as a turn relayed through the chat events' codec. The load generator (CPU 1)
keeps 64 streams going. Run: .venv/bin/python bench/sse_layers.py
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

from gateway.loadtest import Target, closed_loop, print_summary, request_bytes

APP = '''
import uuid

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.routing import Route
from gateway.sse import ChatEvents, EventStream
from gateway.turns import Turn, TurnIds
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

app = Starlette(routes=[Route("/library", library, methods=["POST"]), Route("/own", own, methods=["POST"])])
'''


async def main() -> None:
    os.sched_setaffinity(0, {1})
    with open("/tmp/sse_layers_app.py", "w") as file:
        file.write(APP)
    server = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-m", "uvicorn", "--app-dir", "/tmp",
                               "sse_layers_app:app", "--port", "18777", "--no-access-log", "--log-level",
                               "warning", "--loop", "uvloop", "--http", "httptools"],
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    time.sleep(3)
    try:
        target = Target("127.0.0.1", 18777, "/", {})
        for _ in range(2):
            for path in ("/library", "/own"):
                request = request_bytes(target, path, {})
                report = await closed_loop(64, 5, lambda n: request, target)
                print_summary(path, report.summary())
    finally:
        server.terminate()


asyncio.run(main())
