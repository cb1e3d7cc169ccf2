"""Bearer JWT authentication on Starlette's pure-ASGI authentication middleware: HS256 tokens signed with
the gateway's secret, and RS256/ES256/EdDSA tokens signed by an identity provider that publishes its keys
as a JWKS."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

import jwt
from starlette.authentication import AuthCredentials, AuthenticationBackend, AuthenticationError, BaseUser
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from gateway.edge.errors import Unauthorized, envelope
from gateway.settings import Settings

logger = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics", "/openapi.json", "/docs", "/", "/dev/token"})
# /v1/shared/: a share link is read without a token (gateway/api/shared.py).
PUBLIC_PREFIXES = ("/static/", "/v1/shared/")
_ALGORITHM = "HS256"
# What an identity provider's key may sign with. HS256 is never among them, so a public key from the JWKS
# can never be used as an HMAC secret; ``none`` is accepted by no key source.
ASYMMETRIC_ALGORITHMS = frozenset({"RS256", "ES256", "EdDSA"})
_MAX_ID = 200


@dataclass(frozen=True, slots=True)
class Principal(BaseUser):
    """The caller: a user inside an org, optionally an admin of that org."""

    user_id: str
    org_id: str
    role: str | None = None

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def display_name(self) -> str:
        return self.user_id

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True, slots=True)
class ClaimRules:
    """What a well-signed token must also carry. An audience or issuer, when set, is required in every token
    (HS256 too); the claim names let an identity provider's tokens work unchanged (``org_id``,
    ``https://example.com/org``, Keycloak's ``realm_access.roles``)."""

    audience: str | None = None
    issuer: str | None = None
    org_claim: str = "org"
    role_claim: str = "role"

    def required(self) -> list[str]:
        return ["sub", "exp", *(["aud"] if self.audience else []), *(["iss"] if self.issuer else [])]


def mint_token(secret: str, user_id: str, org_id: str, role: str | None = None, ttl_s: int = 3600) -> str:
    claims: dict[str, object] = {"sub": user_id, "org": org_id, "exp": int(time.time()) + ttl_s}
    if role:
        claims["role"] = role
    return jwt.encode(claims, secret, algorithm=_ALGORITHM)


def decode_token(secret: str, token: str) -> Principal:
    return verify_token(secret, token)[0]


def verify_token(secret: str, token: str, rules: ClaimRules = ClaimRules()) -> tuple[Principal, float]:
    """The principal and expiry time of an HS256 token, once its signature and claims check out."""
    return check_token(token, secret, _ALGORITHM, rules)


def check_token(token: str, key: Any, algorithm: str, rules: ClaimRules) -> tuple[Principal, float]:
    """The token's principal and expiry time, once its signature by ``key`` with ``algorithm`` (and only
    that algorithm) and its claims check out."""
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[algorithm],
            audience=rules.audience,
            issuer=rules.issuer,
            options={"require": rules.required()},
        )
    except jwt.ExpiredSignatureError:
        raise AuthenticationError("Token has expired") from None
    except jwt.InvalidTokenError:
        raise AuthenticationError("Invalid bearer token") from None
    return principal_of_claims(claims, rules), float(claims["exp"])


def principal_of_claims(claims: dict[str, Any], rules: ClaimRules) -> Principal:
    user_id, org_id = claims["sub"], claim(claims, rules.org_claim)
    if org_id is None:
        raise AuthenticationError("Invalid bearer token")
    if not _valid_id(user_id) or not _valid_id(org_id):
        raise AuthenticationError("Token claims are malformed")
    return Principal(user_id, org_id, role_of(claim(claims, rules.role_claim)))


def claim(claims: dict[str, Any], name: str) -> object:
    """The claim called ``name``; when no claim has that exact name, a dotted name walks nested objects."""
    if name in claims:
        return claims[name]
    value: object = claims
    for part in name.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def role_of(value: object) -> str | None:
    """A role claim is a string or, as Keycloak and Cognito send it, a list of strings: admin when it holds
    ``admin``."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return "admin" if "admin" in value else None
    raise AuthenticationError("Token claims are malformed")


def _valid_id(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and 0 < len(value) <= _MAX_ID


class JWKSKeys:
    """An identity provider's signing keys by ``kid``, fetched from its JWKS URL on the first token that needs
    them. A token naming a key the set lacks (a rotation) fetches it again, at most once per ``refetch_s``
    so made-up kids cannot turn every request into a fetch; concurrent requests share one fetch. A set older
    than ``max_age_s`` is refetched in the background, so a key the provider withdrew stops working. A failed
    fetch keeps the keys already known. PyJWT's client uses blocking urllib, so it runs in a thread: the event
    loop carries every open stream."""

    def __init__(
        self,
        url: str,
        refetch_s: float = 60.0,
        max_age_s: float = 300.0,
        timeout_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = jwt.PyJWKClient(url, cache_jwk_set=False, timeout=timeout_s)
        self.refetch_s = refetch_s
        self.max_age_s = max_age_s
        self.clock = clock
        self.keys: dict[str, jwt.PyJWK] = {}
        self.fetched_at: float | None = None  # when the last fetch began, whether or not it succeeded
        self.fetching: asyncio.Task[None] | None = None

    async def key(self, kid: str) -> jwt.PyJWK | None:
        """The key named ``kid``, fetching the set first when it lacks that key and may be fetched."""
        key = self.keys.get(kid)
        if key is not None:
            if self._older_than(self.max_age_s):
                self._fetch()
            return key
        if self.fetching is not None or self._older_than(self.refetch_s):
            await asyncio.shield(self._fetch())  # a caller hanging up does not cancel the others' fetch
        return self.keys.get(kid)

    def _older_than(self, seconds: float) -> bool:
        return self.fetched_at is None or self.clock() - self.fetched_at >= seconds

    def _fetch(self) -> asyncio.Task[None]:
        if self.fetching is None:
            self.fetched_at = self.clock()
            self.fetching = asyncio.create_task(self._load())
        return self.fetching

    async def _load(self) -> None:
        try:
            key_set = await asyncio.to_thread(self.client.get_jwk_set)
        except (jwt.PyJWTError, ValueError, OSError) as error:
            logger.warning(
                "could not fetch the identity provider's keys; the cached ones stay in use",
                extra={"url": self.client.uri, "error": str(error), "cached_keys": len(self.keys)},
            )
        else:
            self.keys = signing_keys(key_set)
        finally:
            self.fetching = None


def signing_keys(key_set: jwt.PyJWKSet) -> dict[str, jwt.PyJWK]:
    """The set's keys that may sign tokens, by kid: a symmetric (``oct``) or encryption key never does."""
    return {
        key.key_id: key
        for key in key_set.keys
        if key.key_id and key.algorithm_name in ASYMMETRIC_ALGORITHMS and key.public_key_use in ("sig", None)
    }


class TokenVerifier:
    """Checks a bearer token's signature and claims. The header's ``alg`` picks the key source, and each
    source admits only its own algorithms: HS256 with the gateway's secret, RS256/ES256/EdDSA with the
    identity provider's key named by ``kid`` and only that key's algorithm."""

    def __init__(
        self, secret: str | None, keys: JWKSKeys | None = None, rules: ClaimRules = ClaimRules()
    ) -> None:
        self.secret = secret
        self.keys = keys
        self.rules = rules

    @classmethod
    def from_settings(cls, settings: Settings, secret: str | None) -> TokenVerifier:
        keys = JWKSKeys(settings.jwt_jwks_url) if settings.jwt_jwks_url else None
        rules = ClaimRules(
            settings.jwt_audience, settings.jwt_issuer, settings.jwt_org_claim, settings.jwt_role_claim
        )
        return cls(secret, keys, rules)

    async def verify(self, token: str) -> tuple[Principal, float]:
        """The token's principal and expiry time, once its signature and claims check out."""
        header = _header(token)
        algorithm = header.get("alg")
        if algorithm == _ALGORITHM and self.secret:
            return check_token(token, self.secret, _ALGORITHM, self.rules)
        kid = header.get("kid")
        if algorithm in ASYMMETRIC_ALGORITHMS and self.keys is not None and isinstance(kid, str):
            key = await self.keys.key(kid)
            if key is not None:
                return check_token(token, key.key, key.algorithm_name, self.rules)
        raise AuthenticationError("Invalid bearer token")


def _header(token: str) -> dict[str, Any]:
    try:
        return jwt.get_unverified_header(token)
    except jwt.InvalidTokenError:
        raise AuthenticationError("Invalid bearer token") from None


class VerifiedTokens:
    """Tokens already verified, with their expiry: a client sends the same token with every request, and
    checking its signature and claims again is a tenth of a saturated worker's time. Bounded; an entry is
    used only while its ``exp`` is in the future."""

    def __init__(
        self, verifier: TokenVerifier, size: int = 10_000, clock: Callable[[], float] = time.time
    ) -> None:
        self.verifier = verifier
        self.size = size
        self.clock = clock
        self.entries: dict[str, tuple[Principal, float]] = {}

    async def principal(self, token: str) -> Principal:
        entry = self.entries.get(token)
        if entry is not None and entry[1] > self.clock():
            return entry[0]
        self.entries.pop(token, None)
        principal, expires = await self.verifier.verify(token)
        if len(self.entries) >= self.size:
            self.entries.clear()  # simpler than LRU; a refill costs one verification per client
        self.entries[token] = (principal, expires)
        return principal


class JWTBackend(AuthenticationBackend):
    def __init__(self, verifier: TokenVerifier) -> None:
        self.tokens = VerifiedTokens(verifier)

    @classmethod
    def from_settings(cls, settings: Settings, secret: str | None) -> JWTBackend:
        return cls(TokenVerifier.from_settings(settings, secret))

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        path = conn.scope["path"]
        if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            return None
        scheme, _, token = conn.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError("Missing bearer token")
        principal = await self.tokens.principal(token.strip())
        scopes = ["authenticated", "admin"] if principal.is_admin else ["authenticated"]
        return AuthCredentials(scopes), principal


def on_auth_error(conn: HTTPConnection, exc: AuthenticationError) -> Response:
    response = envelope(Request(conn.scope), Unauthorized(str(exc)))
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


def principal_of(request: Request) -> Principal:
    user = request.scope.get("user")
    if not isinstance(user, Principal):
        raise Unauthorized()
    return user
