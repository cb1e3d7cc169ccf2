"""A local identity provider for tests: signing keys of each kind, and a JWKS endpoint whose key set can
change during a test (a rotation) or fail (an outage), counting the requests it gets."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import get_default_algorithms
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
ISSUER = "https://issuer.test/"
AUDIENCE = "api"


@dataclass(frozen=True)
class SigningKey:
    """A private key as an identity provider holds it, published under ``kid``."""

    kid: str
    algorithm: str
    private: PrivateKey

    def jwk(self) -> dict[str, Any]:
        public: dict[str, Any] = get_default_algorithms()[self.algorithm].to_jwk(
            self.private.public_key(), as_dict=True
        )
        return {**public, "kid": self.kid, "use": "sig", "alg": self.algorithm}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(claims, self.private, algorithm=self.algorithm, headers={"kid": self.kid})


def new_key(algorithm: str, kid: str) -> SigningKey:
    private: PrivateKey
    if algorithm == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif algorithm == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        private = ed25519.Ed25519PrivateKey.generate()
    return SigningKey(kid, algorithm, private)


def idp_claims(user: str, org: str | None, **extra: Any) -> dict[str, Any]:
    """What an identity provider puts in an access token, with ``extra`` replacing or adding claims (a value
    of None leaves the claim out)."""
    claims = {"sub": user, "org": org, "exp": int(time.time()) + 3600, "aud": AUDIENCE, "iss": ISSUER}
    claims.update(extra)
    return {name: value for name, value in claims.items() if value is not None}


@dataclass
class JWKSServer:
    """Serves ``keys`` (and any raw ``extra`` JWKs) at ``/.well-known/jwks.json``; 503 while ``down``."""

    keys: list[SigningKey] = field(default_factory=list)
    extra: list[dict[str, Any]] = field(default_factory=list)
    down: bool = False
    requests: int = 0
    url: str = ""

    def __post_init__(self) -> None:
        self.app = Starlette(routes=[Route("/.well-known/jwks.json", self.serve)])

    async def serve(self, request: Request) -> Response:
        self.requests += 1
        if self.down:
            return JSONResponse({"error": "unavailable"}, status_code=503)
        return JSONResponse({"keys": [key.jwk() for key in self.keys] + self.extra})
