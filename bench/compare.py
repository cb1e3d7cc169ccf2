"""Same-run A/B: gateways built from two or more versions, served side by side, measured in turns.

Each version (a git revision, or a folder holding a source tree) runs as its own `gateway serve` pinned to
CPU 0, all against the same PostgreSQL, Redis and mock upstream; the load generator (CPU 1) measures them
round after round, alternating their order, with the direct baseline in every round. The medians of the
rounds are what docs/performance.md reports as A/Bs: on a machine whose speed drifts within minutes, only
figures measured side by side compare.

Run: .venv/bin/python bench/compare.py fde50df HEAD [--rounds 6] [--seconds 3] [--concurrency 1]
     [--paths chat,completions]
At concurrency 1 it reports time to first token (p50, and added over direct); above, streams/s. The path
``tls`` is completions with the upstream over https.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
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


async def compare(settings: Settings, versions: list[str], trees: list[Path], args: argparse.Namespace,
                  scratch: Path) -> None:
    pin_to(1)
    mock = await start_mock()
    mock_port = mock.sockets[0].getsockname()[1]
    tls_context, cert_file = throwaway_tls(scratch)
    tls_mock = await start_mock(tls=tls_context)
    tls = TlsUpstream(tls_mock.sockets[0].getsockname()[1], cert_file)
    paths = args.paths.split(",")
    key = "ttft_p50_ms" if args.concurrency == 1 else "streams_per_s"
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
        direct: list[float] = []
        figures: dict[tuple[int, str], list[tuple[float, float]]] = {(n, p): [] for n in range(len(trees)) for p in paths}
        for round_ in range(args.rounds):
            direct.append((await benches[0].load("direct", args.concurrency))[key])
            order = range(len(trees)) if round_ % 2 == 0 else reversed(range(len(trees)))
            for n in order:
                for path in paths:
                    summary = await benches[n].load(path, args.concurrency)
                    figures[n, path].append((summary[key], summary["ttft_p99_ms"]))
            print(f"round {round_ + 1}: direct {direct[-1]:.3f}, " + ", ".join(
                f"{versions[n]} {p} {figures[n, p][-1][0]:.3f}" for n in range(len(trees)) for p in paths), flush=True)
    mock.close()
    tls_mock.close()
    baseline = statistics.median(direct)
    print(f"direct: median {baseline:.3f} {key}")
    for (n, path), values in figures.items():
        median = statistics.median(v for v, _ in values)
        p99 = statistics.median(p for _, p in values)
        added = f", added {median - baseline:+.3f} ms" if args.concurrency == 1 else ""
        print(f"{versions[n]} {path}: median {median:.3f} {key}{added}; p99 TTFT median {p99:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("versions", nargs="+", help="git revisions or source folders")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each measurement")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--paths", default="chat,completions", help="chat, chat-id (each message with a "
                        "client_message_id), completions, tls (completions over an https upstream) and/or new-chat")
    args = parser.parse_args()
    with (source_trees(args.versions) as trees, with_services(load_settings()) as settings,
          tempfile.TemporaryDirectory(prefix="streamgate-compare-tls-") as scratch):
        uvloop.run(compare(settings, args.versions, trees, args, Path(scratch)))


if __name__ == "__main__":
    main()
