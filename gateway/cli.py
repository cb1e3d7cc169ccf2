"""The ``gateway`` command: serve, migrate, token, bench, loadtest."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

import uvicorn

from gateway.edge.auth import mint_token
from gateway.edge.logs import configure_logging
from gateway.embedded import database_or_embedded, resolve_jwt_secret, with_services
from gateway.settings import WORKER_NUMBERS, Settings, SettingsError, load_settings
from storage.migrations import migrate

logger = logging.getLogger("gateway.cli")


def _note_signal(signum: int, frame: object) -> None:
    logger.info("shut down on signal", extra={"signal": signal.Signals(signum).name})


def serve(settings: Settings, args: argparse.Namespace) -> None:
    # uvicorn re-raises the signal that stopped it once it has shut down; handled here, it lets the
    # embedded servers stop cleanly instead of the process dying with them still running.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _note_signal)
    resolve_jwt_secret(settings)  # create the dev secret once, before any worker reads it
    if args.workers > 1:
        prepare_multiprocess_metrics(settings.data_dir / "metrics")
        os.environ[WORKER_NUMBERS] = str((settings.data_dir / "workers").resolve())
    with with_services(settings) as ready:
        # Workers build the app from the environment, so hand them the URLs of any embedded service.
        os.environ["GATEWAY_DATABASE_URL"] = ready.database_url or ""
        os.environ["GATEWAY_REDIS_URL"] = ready.redis_url or ""
        if not settings.database_url and not settings.redis_url:  # the zero-setup default is development
            os.environ.setdefault("GATEWAY_DEV_MODE", "true")
        logger.info("serving", extra={"host": args.host, "port": args.port, "workers": args.workers})
        uvicorn.run(
            "gateway.app:create_app",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            loop="uvloop",
            http="httptools",
            log_config=None,
            timeout_graceful_shutdown=settings.shutdown_grace_s,  # type: ignore[arg-type]  # any number works
        )


def prepare_multiprocess_metrics(folder: Path) -> None:
    """Workers write their metrics to files in ``folder``; it must exist, empty, before any starts."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder.resolve())


def run_migrations(settings: Settings, args: argparse.Namespace) -> None:
    with database_or_embedded(settings) as database_url:
        applied = asyncio.run(migrate(database_url))
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")


def token(settings: Settings, args: argparse.Namespace) -> None:
    print(mint_token(resolve_jwt_secret(settings), args.user, args.org, args.role, args.ttl))


def bench(settings: Settings, args: argparse.Namespace) -> None:
    from bench.harness import main as run_bench

    run_bench(settings, args.seconds, args.quick, bench_folder(settings, args))


def bench_folder(settings: Settings, args: argparse.Namespace) -> Path:
    """Where the bench writes its JSON: ``--out``; with ``--save`` the repository's bench/results (what
    docs/performance.md cites); else the git-ignored data folder, so a run leaves ``git status`` clean."""
    if args.out:
        return Path(args.out)
    return Path("bench/results") if args.save else settings.data_dir / "bench"


def loadtest(settings: Settings, args: argparse.Namespace) -> None:
    from bench.loadtest import LoadtestError, run_loadtest

    try:
        run_loadtest(args.url, args.token, args.concurrency, args.duration, args.model, args.message,
                     args.stall_ms, as_json=args.json)
    except LoadtestError as error:
        print(f"gateway loadtest: {error}", file=sys.stderr)
        sys.exit(2)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="gateway", description="Streamgate, a streaming gateway for LLM chat")
    commands = root.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the HTTP server")
    serve_cmd.add_argument("--host", default="127.0.0.1")
    serve_cmd.add_argument("--port", type=int, default=8000)
    serve_cmd.add_argument("--workers", type=int, default=1)
    serve_cmd.set_defaults(handler=serve)
    commands.add_parser("migrate", help="apply pending database migrations").set_defaults(
        handler=run_migrations
    )
    token_cmd = commands.add_parser("token", help="print a signed development JWT")
    token_cmd.add_argument("--user", required=True)
    token_cmd.add_argument("--org", required=True)
    token_cmd.add_argument("--role", choices=["admin"])
    token_cmd.add_argument("--ttl", type=int, default=3600)
    token_cmd.set_defaults(handler=token)
    bench_cmd = commands.add_parser("bench", help="benchmark the gateway against a direct baseline")
    bench_cmd.add_argument("--seconds", type=float, default=5.0, help="length of each measurement")
    bench_cmd.add_argument("--quick", action="store_true", help="fewer samples and smaller loads")
    bench_cmd.add_argument("--save", action="store_true",
                           help="write the results to bench/results/<date>.json (default: <data dir>/bench)")
    bench_cmd.add_argument("--out", help="write the results to this folder instead")
    bench_cmd.set_defaults(handler=bench)
    load_cmd = commands.add_parser("loadtest", help="drive any Streamgate with streaming load")
    load_cmd.add_argument("url", help="e.g. http://127.0.0.1:8000/v1/chat or .../v1/chat/completions")
    load_cmd.add_argument("--token", help="a bearer token (see `gateway token`)")
    load_cmd.add_argument("--concurrency", type=int, default=10)
    load_cmd.add_argument("--duration", type=float, default=10.0)
    load_cmd.add_argument("--model", default="fake/echo", help="for completions and /v1/chat; a chat's "
                                                              "messages go to the chat's own model")
    load_cmd.add_argument("--message", default="the quick brown fox jumps over the lazy dog")
    load_cmd.add_argument("--stall-ms", type=float, default=200.0,
                          help="a gap between two tokens over this is a stall (the bench's: twice the "
                               "gap of a 10 tokens/s stream)")
    load_cmd.add_argument("--json", action="store_true",
                          help="print the result as one JSON object on stdout (progress stays on stderr)")
    load_cmd.set_defaults(handler=loadtest)
    return root


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as error:
        sys.exit(f"gateway: {error}")
    configure_logging(settings.log_level, settings.log_format)
    args.handler(settings, args)


if __name__ == "__main__":
    main()
