"""Bearer JWT authentication (HS256) on Starlette's pure-ASGI authentication middleware."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import jwt
from starlette.authentication import AuthCredentials, AuthenticationBackend, AuthenticationError, BaseUser
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from gateway.errors import Unauthorized, envelope

PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics", "/openapi.json", "/docs", "/", "/dev/token"})
PUBLIC_PREFIXES = ("/static/",)
_ALGORITHM = "HS256"
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


def mint_token(secret: str, user_id: str, org_id: str, role: str | None = None, ttl_s: int = 3600) -> str:
    claims: dict[str, object] = {"sub": user_id, "org": org_id, "exp": int(time.time()) + ttl_s}
    if role:
        claims["role"] = role
    return jwt.encode(claims, secret, algorithm=_ALGORITHM)


def decode_token(secret: str, token: str) -> Principal:
    return verify_token(secret, token)[0]


def verify_token(secret: str, token: str) -> tuple[Principal, float]:
    """The token's principal and expiry time, once its signature and claims check out."""
    try:
        claims = jwt.decode(
            token, secret, algorithms=[_ALGORITHM], options={"require": ["sub", "org", "exp"]}
        )
    except jwt.ExpiredSignatureError:
        raise AuthenticationError("Token has expired") from None
    except jwt.InvalidTokenError:
        raise AuthenticationError("Invalid bearer token") from None
    user_id, org_id, role = claims["sub"], claims["org"], claims.get("role")
    if not _valid_id(user_id) or not _valid_id(org_id) or not (role is None or isinstance(role, str)):
        raise AuthenticationError("Token claims are malformed")
    return Principal(user_id, org_id, role), float(claims["exp"])


def _valid_id(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= _MAX_ID


class VerifiedTokens:
    """Tokens already verified, with their expiry: a client sends the same token with every request, and
    checking its signature and claims again is a tenth of a saturated worker's time. Bounded; an entry is
    used only while its ``exp`` is in the future."""

    def __init__(self, secret: str, size: int = 10_000, clock: Callable[[], float] = time.time) -> None:
        self.secret = secret
        self.size = size
        self.clock = clock
        self.entries: dict[str, tuple[Principal, float]] = {}

    def principal(self, token: str) -> Principal:
        entry = self.entries.get(token)
        if entry is not None and entry[1] > self.clock():
            return entry[0]
        self.entries.pop(token, None)
        principal, expires = verify_token(self.secret, token)
        if len(self.entries) >= self.size:
            self.entries.clear()  # simpler than LRU; a refill costs one verification per client
        self.entries[token] = (principal, expires)
        return principal


class JWTBackend(AuthenticationBackend):
    def __init__(self, secret: str) -> None:
        self.tokens = VerifiedTokens(secret)

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        path = conn.scope["path"]
        if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            return None
        scheme, _, token = conn.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError("Missing bearer token")
        principal = self.tokens.principal(token.strip())
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
