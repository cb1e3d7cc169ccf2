"""Same-run A/B: gateways built from two or more versions, served side by side, measured in turns.

Each version (a git revision, or a folder holding a source tree) runs as its own `gateway serve` pinned to
CPU 0, all against the same PostgreSQL, Redis and mock upstream; the load generator (CPU 1) measures them
round after round, alternating their order, with the direct baseline in every round. The medians of the
rounds are what docs/performance.md reports as A/Bs: on a machine whose speed drifts within minutes, only
figures measured side by side compare.

Run: .venv/bin/python bench/compare.py fde50df HEAD [--rounds 6] [--seconds 3] [--concurrency 1]
     [--paths chat,completions]
At concurrency 1 it reports time to first token (p50, and added over direct); above, streams/s and the
worker's CPU a stream; with ``--paced N``, the worker's CPU per token with N streams at 10 tokens/s; with
``--memory LOW,HIGH``, once, each fresh gateway's memory per idle stream. The path ``tls`` is completions
with the upstream over https. Each version's chats stay in the database until the end: a fresh database
per A/B (the embedded default) keeps one A/B's chats out of the next one's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import uvloop

from bench.harness import Bench, TlsUpstream, gateway_server, pin_to
from bench.mock_upstream import start_mock, throwaway_tls
from gateway.embedded import with_services
from gateway.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def source_trees(versions: list[str]) -> Iterator[list[Path]]:
    """A folder per version: as given, or a temporary worktree of the revision (removed afterwards)."""
    with tempfile.TemporaryDirectory(prefix="streamgate-compare-") as scratch:
        trees, added = [], []
        try:
            for n, version in enumerate(versions):
                if Path(version).is_dir():
                    trees.append(Path(version).resolve())
                    continue
                tree = Path(scratch) / f"{n}-{version.replace('/', '_')}"
                subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), version],
                               check=True)
                added.append(tree)
                trees.append(tree)
            yield trees
        finally:
            for tree in added:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)


def measurement(args: argparse.Namespace) -> tuple[str, Callable[[Bench, str], Awaitable[dict[str, float]]]]:
    """The figure the rounds compare and how one pass measures it: time to first token (concurrency 1),
    streams/s (above), or with ``--paced`` the worker's CPU per token with that many streams at 10 tokens/s
    (what bounds the capacity ladder, steadier than the ladder's stall count)."""
    if args.paced:
        async def paced(bench: Bench, path: str) -> dict[str, float]:
            window = await bench.paced_window(args.paced, path=path)
            await asyncio.sleep(1)  # let the gateway store the cancelled streams before the next pass
            return {**window, "ttft_p99_ms": 0.0}
        return "worker_us_per_token", paced
    key = "ttft_p50_ms" if args.concurrency == 1 else "streams_per_s"
    return key, lambda bench, path: bench.load_and_cpu(path, args.concurrency)


async def compare(settings: Settings, versions: list[str], trees: list[Path], args: argparse.Namespace,
                  scratch: Path) -> None:
    pin_to(1)
    mock = await start_mock()
    mock_port = mock.sockets[0].getsockname()[1]
    tls_context, cert_file = throwaway_tls(scratch)
    tls_mock = await start_mock(tls=tls_context)
    tls = TlsUpstream(tls_mock.sockets[0].getsockname()[1], cert_file)
    paths = args.paths.split(",")
    key, measure = measurement(args)
    assert settings.database_url
    async with contextlib.AsyncExitStack() as stack:
        benches = []
        for n, tree in enumerate(trees):
            log = Path(tempfile.gettempdir()) / f"streamgate-compare-{n}.log"
            port, pid = await stack.enter_async_context(gateway_server(settings, mock_port, log, tree, tls))
            bench = Bench(port, pid, mock_port, args.seconds, settings.database_url)
            stack.push_async_callback(bench.erase)
            await bench.make_chats(max(args.concurrency, 100))
            await bench.seed()
            benches.append(bench)
        if args.memory:  # on the fresh processes, once: a second pass would reuse the first one's memory
            low, high = (int(v) for v in args.memory.split(","))
            for n, bench in enumerate(benches):
                memory = await bench.memory(low, high)
                print(f"{versions[n]} memory: RSS before {memory['boot_mib']:.1f} MiB, "
                      f"{memory['kib_per_idle_stream']:.2f} KiB per idle stream", flush=True)
        direct: list[float] = []
        figures: dict[tuple[int, str], list[dict[str, float]]] = {(n, p): [] for n in range(len(trees)) for p in paths}
        for round_ in range(args.rounds):
            if not args.paced:
                direct.append((await benches[0].load("direct", args.concurrency))[key])
            order = range(len(trees)) if round_ % 2 == 0 else reversed(range(len(trees)))
            for n in order:
                for path in paths:
                    figures[n, path].append(await measure(benches[n], path))
            print(f"round {round_ + 1}: " + (f"direct {direct[-1]:.3f}, " if direct else "") + ", ".join(
                f"{versions[n]} {p} {figures[n, p][-1][key]:.3f}" for n in range(len(trees)) for p in paths), flush=True)
    mock.close()
    tls_mock.close()
    baseline = statistics.median(direct) if direct else 0.0
    if direct:
        print(f"direct: median {baseline:.3f} {key}")
    for (n, path), passes in figures.items():
        median = statistics.median(f[key] for f in passes)
        added = f", added {median - baseline:+.3f} ms" if key == "ttft_p50_ms" else ""
        if args.paced:
            rest = f"; stalled {sum(f['stalled'] for f in passes):.0f} of {sum(f['opened'] for f in passes):.0f}"
        else:
            rest = (f"; p99 TTFT median {statistics.median(f['ttft_p99_ms'] for f in passes):.2f} ms; worker CPU "
                    f"{statistics.median(f['worker_cpu_ms_per_stream'] for f in passes):.3f} ms a stream")
        print(f"{versions[n]} {path}: median {median:.3f} {key}{added}{rest}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("versions", nargs="+", help="git revisions or source folders")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each measurement")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--paced", type=int, default=0, help="streams at 10 tokens/s: compare the worker's CPU "
                        "per token (paths: new-chat, completions)")
    parser.add_argument("--memory", default="", help="LOW,HIGH idle streams: each fresh gateway's KiB per idle "
                        "stream, measured once before the rounds")
    parser.add_argument("--paths", default="chat,completions", help="chat, chat-id (each message with a "
                        "client_message_id), completions, tls (completions over an https upstream) and/or new-chat")
    args = parser.parse_args()
    with (source_trees(args.versions) as trees, with_services(load_settings()) as settings,
          tempfile.TemporaryDirectory(prefix="streamgate-compare-tls-") as scratch):
        uvloop.run(compare(settings, args.versions, trees, args, Path(scratch)))


if __name__ == "__main__":
    main()
