"""Settings from the environment (prefix ``GATEWAY_``) and an optional ``.env`` file."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

# Set by `gateway serve --workers N` for its workers: the folder where each takes its number (gateway/app.py).
WORKER_NUMBERS = "GATEWAY_WORKER_NUMBERS"


class SettingsError(Exception):
    """A setting is missing or malformed; the message names the environment variable."""


class Endpoint(BaseModel):
    """A named OpenAI-compatible server: ``local/llama-3-8b`` goes to the endpoint named ``local``."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["openai"] = "openai"
    base_url: str
    api_key_env: str | None = None
    models: list[str] = []


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", env_file=".env", extra="ignore")

    database_url: str | None = None
    redis_url: str | None = None
    redis_prefix: str = "sg:"
    redis_max_connections: int = Field(default=2000, ge=4)
    jwt_secret: str | None = Field(default=None, min_length=16)
    # An identity provider's signing keys (RS256, ES256, EdDSA): tokens are checked against them, HS256 with
    # ``jwt_secret`` stays for development. Audience and issuer, when set, are required in every token.
    jwt_jwks_url: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_org_claim: str = Field(default="org", min_length=1)
    jwt_role_claim: str = Field(default="role", min_length=1)
    default_model: str = "fake/echo"
    # A model that writes a chat's title beside its first turn (unless the user named the chat); unset: the
    # first message, cut, is the title.
    title_model: str | None = None
    fake_provider: bool = True  # the keyless ``fake/...`` models; a production deployment turns them off
    data_dir: Path = Path(".streamgate")
    instance_id: str | None = None
    dev_mode: bool = False  # set by `gateway serve` when it starts embedded services

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "text"] = "auto"  # auto: text on a terminal, JSON lines otherwise
    db_pool_min: int = Field(default=2, ge=1)
    db_pool_max: int = Field(default=20, ge=1)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)  # a JSON body's; uploads have their own
    # An uploaded file's bytes (POST /v1/files), and what one request to a model carries of files in all.
    max_file_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    max_file_storage_bytes: int | None = Field(default=None, ge=0)  # a user's files together; None: no cap

    max_chats_per_user: int | None = Field(default=None, ge=1)
    max_message_chars: int = Field(default=10_000, ge=1)
    history_messages: int = Field(default=20, ge=0)
    history_chars: int = Field(default=60_000, ge=0)

    checkpoint_s: float = Field(default=2.0, gt=0)
    stream_lease_s: float = Field(default=30.0, gt=0)
    send_timeout_s: float = Field(default=30.0, gt=0)
    ping_s: float = Field(default=15.0, gt=0)
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    # A turn's final write, retried while PostgreSQL is away, for this long before the client is told.
    store_retry_s: float = Field(default=60.0, ge=0)

    # Resumable streams (storage/tapes.py): each chat turn's events kept in Redis, flushed every
    # ``resume_flush_s`` for all of a worker's turns, until ``resume_retention_s`` after the turn ends.
    resumable: bool = True
    resume_retention_s: float = Field(default=300.0, gt=0)
    resume_flush_s: float = Field(default=0.01, gt=0, le=1)
    max_readers_per_turn: int = Field(default=8, ge=1)
    # What a sender hanging up does to its turn, unless the send says: ``cancel`` it, or let it
    # ``continue`` unread (for at most ``detached_max_s``) to its end.
    on_disconnect: Literal["cancel", "continue"] = "cancel"
    detached_max_s: float = Field(default=600.0, gt=0)
    # Allocations between two collections of the youngest generation (CPython's default is 700). At that
    # default, tokens in flight reach the oldest generation and set off full collections, each pausing
    # the worker for 0.1 ms per 1,000 objects (about 100 per open stream); see docs/performance.md.
    gc_young_threshold: int = Field(default=10_000, ge=100)

    # Providers: credentials come from each SDK's own variables (OPENAI_API_KEY, ANTHROPIC_API_KEY, ...).
    providers: dict[str, Endpoint] = {}
    fallbacks: dict[str, list[str]] = {}
    # Load the SDK of every vendor with credentials before serving, rather than on its first call, which
    # imports it on the event loop and stalls every stream of the worker meanwhile (1.3-3.6 s a vendor
    # here). Measured at boot: OpenAI's alone +14 MiB and 0.5 s to ready; all three +79 MiB and 4.9 s.
    preload_providers: bool = False
    gemini_base_url: str | None = None
    connect_timeout_s: float = Field(default=10.0, gt=0)
    first_token_timeout_s: float = Field(default=60.0, gt=0)
    idle_timeout_s: float = Field(default=60.0, gt=0)
    upstream_max_connections: int = Field(default=10_000, ge=1)
    retries: int = Field(default=1, ge=0, le=5)
    retry_backoff_s: float = Field(default=0.25, ge=0)
    max_retry_wait_s: float = Field(default=5.0, ge=0)

    # Quotas: None is unlimited. Per-subject overrides live in PostgreSQL (see /v1/admin/quotas).
    quota_user_tokens: int | None = Field(default=None, ge=0)
    quota_org_tokens: int | None = Field(default=None, ge=0)
    quota_period: Literal["day", "month"] = "day"
    quota_requests_per_minute: int | None = Field(default=None, ge=0)
    quota_org_requests_per_minute: int | None = Field(default=None, ge=0)  # an org's own, beside each user's
    quota_max_concurrent_streams: int | None = Field(default=None, ge=0)
    quota_default_max_tokens: int = Field(default=1024, ge=1)
    quota_fail_mode: Literal["closed", "open"] = "closed"
    quota_limits_cache_s: int = Field(default=300, ge=1)


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning pydantic's error into one that names each variable at fault."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        problems = "; ".join(
            f"GATEWAY_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in error.errors()
        )
        raise SettingsError(f"invalid settings: {problems}") from None
