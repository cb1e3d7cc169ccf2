"""Who a caller is: shared-secret and identity-provider tokens, the key set's cache, claims and roles.

Past 400 lines because each of the identity provider's cases needs its own key set served over HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest
from starlette.authentication import AuthenticationError

from gateway.edge.auth import JWKSKeys, JWTBackend, TokenVerifier, VerifiedTokens, mint_token
from tests.conftest import JWT_SECRET, Gateway, auth_headers
from tests.jwks import AUDIENCE, ISSUER, JWKSServer, idp_claims, new_key
from tests.servers import serve_app


async def test_valid_token_is_accepted(client: httpx.AsyncClient, alice: dict[str, str]) -> None:
    response = await client.get("/v1/chats", headers=alice)
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "Missing bearer token"),
        ({"Authorization": "Bearer not-a-jwt"}, "Invalid bearer token"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "Missing bearer token"),
        (auth_headers("u1", "o1", ttl=-10), "Token has expired"),
        (
            {"Authorization": "Bearer " + jwt.encode({"sub": "u1", "org": "o1", "exp": 2**40}, "wrong" * 8)},
            "Invalid bearer token",
        ),
        (
            {"Authorization": "Bearer " + jwt.encode({"sub": "u1", "exp": 2**40}, JWT_SECRET)},
            "Invalid bearer token",
        ),
        (
            {"Authorization": "Bearer " + jwt.encode({"sub": "u1", "org": "o1"}, JWT_SECRET)},
            "Invalid bearer token",
        ),
        (
            {"Authorization": "Bearer " + jwt.encode({"sub": 7, "org": "o1", "exp": 2**40}, JWT_SECRET)},
            "Invalid bearer token",
        ),
        (
            {
                "Authorization": "Bearer "
                + jwt.encode({"sub": "u1", "org": "o1", "exp": 2**40}, JWT_SECRET, algorithm="HS512")
            },
            "Invalid bearer token",
        ),
    ],
    ids=[
        "missing",
        "malformed",
        "basic",
        "expired",
        "wrong-secret",
        "no-org",
        "no-exp",
        "numeric-sub",
        "hs512",
    ],
)
async def test_bad_token_gets_401_envelope(
    client: httpx.AsyncClient, headers: dict[str, str], message: str
) -> None:
    response = await client.get("/v1/chats", headers={**headers, "X-Request-ID": "auth-1"})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json() == {
        "error": {"code": "unauthorized", "message": message, "status": 401, "request_id": "auth-1"}
    }


async def test_a_verified_token_is_reused_only_until_it_expires() -> None:
    now = [1_000_000.0]
    tokens = VerifiedTokens(TokenVerifier(JWT_SECRET), clock=lambda: now[0])
    token = jwt.encode({"sub": "u1", "org": "o1", "exp": 1_000_060}, JWT_SECRET)
    with pytest.raises(AuthenticationError, match="expired"):  # the real clock is far past this exp
        await tokens.principal(token)
    fresh = mint_token(JWT_SECRET, "u2", "o2", ttl_s=60)
    assert (await tokens.principal(fresh)).user_id == "u2"
    now[0] = float(jwt.decode(fresh, options={"verify_signature": False})["exp"]) - 1
    assert (await tokens.principal(fresh)).org_id == "o2"  # cached, not yet expired
    now[0] += 2
    tokens.verifier = TokenVerifier("another-secret-" + "y" * 32)  # re-verifying fails: the entry goes unused
    with pytest.raises(AuthenticationError, match="Invalid"):
        await tokens.principal(fresh)


# Tokens from an identity provider, checked against the keys it publishes at a local JWKS endpoint.

# A symmetric key, which a JWKS may hold but which must never verify a token: HMAC uses the gateway's secret.
SHARED_SECRET = b"s" * 32
SHARED_SECRET_JWK = {"kty": "oct", "kid": "shared", "k": base64.urlsafe_b64encode(SHARED_SECRET).decode()}


class Clock:
    """The time as the gateway's key cache sees it, moved on by the test instead of waited for."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class IdentityProviderGateway:
    """A gateway that trusts the test's JWKS endpoint: a client of it, and the clock of its key cache."""

    http: httpx.AsyncClient
    clock: Clock

    async def status(self, token: str, path: str = "/v1/chats") -> int:
        response = await self.http.get(path, headers={"Authorization": f"Bearer {token}"})
        return response.status_code


@pytest.fixture
async def jwks() -> AsyncIterator[JWKSServer]:
    server = JWKSServer()
    async with serve_app(server.app) as url:
        server.url = url + "/.well-known/jwks.json"
        yield server


@pytest.fixture
def trusting(
    start_gateway: Callable[..., contextlib.AbstractAsyncContextManager[Gateway]], jwks: JWKSServer
) -> Callable[..., contextlib.AbstractAsyncContextManager[IdentityProviderGateway]]:
    """Start a gateway trusting the test's JWKS endpoint, audience and issuer, with other settings changed."""

    @contextlib.asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[IdentityProviderGateway]:
        settings = {"jwt_jwks_url": jwks.url, "jwt_audience": AUDIENCE, "jwt_issuer": ISSUER, **overrides}
        async with start_gateway(**settings) as gateway:
            async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
                clock = jwks_keys(gateway).clock = Clock()
                yield IdentityProviderGateway(http, clock)

    return start


def jwks_keys(gateway: Gateway) -> JWKSKeys:
    """The key cache of the gateway's authentication backend, to give it the test's clock."""
    backend = next(m.kwargs["backend"] for m in gateway.app.user_middleware if "backend" in m.kwargs)
    assert isinstance(backend, JWTBackend) and backend.tokens.verifier.keys is not None
    return backend.tokens.verifier.keys


def user() -> str:
    return f"u-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("algorithm", ["RS256", "ES256", "EdDSA"])
async def test_a_token_signed_by_the_current_key_is_accepted(
    trusting: Callable[..., Any], jwks: JWKSServer, algorithm: str
) -> None:
    key = new_key(algorithm, "current")
    jwks.keys = [key]
    async with trusting() as gateway:
        assert jwks.requests == 0  # fetched on the first token that needs it, not at startup
        response = await gateway.http.get(
            "/v1/usage", headers={"Authorization": f"Bearer {key.sign(idp_claims('idp-user', 'idp-org'))}"}
        )
        assert response.status_code == 200
        assert (response.json()["user_id"], response.json()["org_id"]) == ("idp-user", "idp-org")
        assert await gateway.status(key.sign(idp_claims(user(), "o"))) == 200
        assert jwks.requests == 1


async def test_a_rotated_in_key_works_after_exactly_one_refetch(
    trusting: Callable[..., Any], jwks: JWKSServer
) -> None:
    old, rotated_in = new_key("RS256", "2024"), new_key("ES256", "2025")
    jwks.keys = [old]
    async with trusting() as gateway:
        assert await gateway.status(old.sign(idp_claims(user(), "o"))) == 200
        jwks.keys = [old, rotated_in]
        gateway.clock.now += 61
        assert await gateway.status(rotated_in.sign(idp_claims(user(), "o"))) == 200
        assert await gateway.status(rotated_in.sign(idp_claims(user(), "o"))) == 200
        assert await gateway.status(old.sign(idp_claims(user(), "o"))) == 200
        assert jwks.requests == 2


async def test_a_token_by_an_unknown_key_is_401_and_refetches_at_most_once_a_minute(
    trusting: Callable[..., Any], jwks: JWKSServer
) -> None:
    known, stranger = new_key("RS256", "known"), new_key("RS256", "stranger")
    jwks.keys = [known]
    async with trusting() as gateway:
        assert await gateway.status(known.sign(idp_claims(user(), "o"))) == 200
        gateway.clock.now += 61
        assert await gateway.status(stranger.sign(idp_claims(user(), "o"))) == 401
        assert jwks.requests == 2
        gateway.clock.now += 59
        assert await gateway.status(stranger.sign(idp_claims(user(), "o"))) == 401
        assert jwks.requests == 2  # within the minute: no fetch
        gateway.clock.now += 1
        assert await gateway.status(stranger.sign(idp_claims(user(), "o"))) == 401
        assert jwks.requests == 3


async def test_concurrent_lookups_of_an_unknown_key_share_one_fetch(jwks: JWKSServer) -> None:
    jwks.keys = [new_key("EdDSA", "k1")]
    keys = JWKSKeys(jwks.url)
    found = await asyncio.gather(*(keys.key("k1") for _ in range(20)))
    assert all(key is not None and key.key_id == "k1" for key in found)
    assert jwks.requests == 1


async def test_a_jwks_endpoint_that_is_down_leaves_the_cached_keys_in_use(
    trusting: Callable[..., Any], jwks: JWKSServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.edge.auth")
    known, rotated_in = new_key("ES256", "known"), new_key("ES256", "new")
    jwks.keys = [known]
    async with trusting() as gateway:
        assert await gateway.status(known.sign(idp_claims(user(), "o"))) == 200
        jwks.keys, jwks.down = [known, rotated_in], True
        gateway.clock.now += 61
        assert await gateway.status(rotated_in.sign(idp_claims(user(), "o"))) == 401
        assert await gateway.status(known.sign(idp_claims(user(), "o"))) == 200
        assert jwks.requests == 2
    assert any(
        record.levelno == logging.WARNING and "identity provider's keys" in record.getMessage()
        for record in caplog.records
    )


async def test_a_key_set_past_its_max_age_is_refetched_so_a_withdrawn_key_stops_working(
    jwks: JWKSServer,
) -> None:
    withdrawn, successor = new_key("RS256", "withdrawn"), new_key("RS256", "successor")
    jwks.keys = [withdrawn]
    clock = Clock()
    keys = JWKSKeys(jwks.url, refetch_s=600, max_age_s=300, clock=clock)  # no refetch for an unknown kid here
    assert await keys.key("withdrawn") is not None
    jwks.keys = [successor]
    clock.now += 301
    assert await keys.key("withdrawn") is not None  # served at once; the refetch runs in the background
    assert await keys.key("successor") is not None  # waits for that refetch, which brought the successor
    assert await keys.key("withdrawn") is None
    assert jwks.requests == 2


async def test_the_key_cache_holds_only_asymmetric_signing_keys(jwks: JWKSServer) -> None:
    signing, encrypting = new_key("RS256", "signing"), new_key("RS256", "encrypting")
    jwks.keys = [signing]
    jwks.extra = [
        {**encrypting.jwk(), "use": "enc", "alg": "RSA-OAEP"},
        {**encrypting.jwk(), "kid": "encrypting-rs256", "use": "enc"},
        SHARED_SECRET_JWK,
    ]
    keys = JWKSKeys(jwks.url)
    assert await keys.key("signing") is not None
    assert [await keys.key(kid) for kid in ("encrypting", "encrypting-rs256", "shared")] == [None, None, None]


@pytest.mark.parametrize(
    "claims",
    [{"aud": "another-api"}, {"iss": "https://another.test/"}, {"aud": None}, {"iss": None}],
    ids=["wrong-audience", "wrong-issuer", "no-audience", "no-issuer"],
)
async def test_audience_and_issuer_are_required_when_set(
    trusting: Callable[..., Any], jwks: JWKSServer, claims: dict[str, Any]
) -> None:
    key = new_key("RS256", "k1")
    jwks.keys = [key]
    async with trusting() as gateway:
        assert await gateway.status(key.sign(idp_claims(user(), "o"))) == 200
        assert await gateway.status(key.sign(idp_claims(user(), "o", **claims))) == 401


async def test_audience_and_issuer_apply_to_hs256_tokens_too(
    trusting: Callable[..., Any], jwks: JWKSServer
) -> None:
    async with trusting() as gateway:
        assert await gateway.status(mint_token(JWT_SECRET, user(), "o")) == 401
        assert await gateway.status(jwt.encode(idp_claims(user(), "o"), JWT_SECRET)) == 200


@pytest.mark.parametrize(
    ("org_claim", "role_claim", "admin", "member"),
    [
        ("https://example.com/org", "roles", {"roles": ["reader", "admin"]}, {"roles": ["reader"]}),
        ("org_id", "role", {"role": "admin"}, {"role": "member"}),
        (
            "org_id",
            "realm_access.roles",
            {"realm_access": {"roles": ["admin"]}},
            {"realm_access": {"roles": []}},
        ),
    ],
    ids=["url-org-and-role-list", "org-id-and-role-string", "keycloak-realm-roles"],
)
async def test_custom_org_and_role_claims_decide_who_reaches_admin_routes(
    trusting: Callable[..., Any],
    jwks: JWKSServer,
    org_claim: str,
    role_claim: str,
    admin: dict[str, Any],
    member: dict[str, Any],
) -> None:
    key = new_key("RS256", "k1")
    jwks.keys = [key]
    org = f"org-{uuid.uuid4().hex[:8]}"
    async with trusting(jwt_org_claim=org_claim, jwt_role_claim=role_claim) as gateway:
        admin_token = key.sign(idp_claims(user(), None, **{org_claim: org}, **admin))
        response = await gateway.http.get("/v1/usage", headers={"Authorization": f"Bearer {admin_token}"})
        assert response.json()["org_id"] == org
        assert await gateway.status(admin_token, "/v1/admin/quotas/user/x") == 200
        member_token = key.sign(idp_claims(user(), None, **{org_claim: org}, **member))
        assert await gateway.status(member_token, "/v1/admin/quotas/user/x") == 403
        assert await gateway.status(key.sign(idp_claims(user(), org, **admin))) == 401  # no custom org claim


async def test_a_malformed_role_claim_is_401(trusting: Callable[..., Any], jwks: JWKSServer) -> None:
    key = new_key("RS256", "k1")
    jwks.keys = [key]
    async with trusting(jwt_role_claim="roles") as gateway:
        assert await gateway.status(key.sign(idp_claims(user(), "o", roles=["admin", 7]))) == 401


async def test_an_hs256_token_still_works_alongside_a_jwks(
    trusting: Callable[..., Any], jwks: JWKSServer
) -> None:
    key = new_key("EdDSA", "k1")
    jwks.keys = [key]
    async with trusting(jwt_audience=None, jwt_issuer=None) as gateway:
        assert await gateway.status(mint_token(JWT_SECRET, user(), "o")) == 200
        assert await gateway.status(key.sign(idp_claims(user(), "o", aud=None, iss=None))) == 200


async def test_a_token_naming_an_audience_is_401_until_the_audience_is_set(
    trusting: Callable[..., Any], jwks: JWKSServer
) -> None:
    key = new_key("RS256", "k1")
    jwks.keys = [key]
    async with trusting(jwt_audience=None) as gateway:
        assert await gateway.status(key.sign(idp_claims(user(), "o", aud=None))) == 200
        assert await gateway.status(key.sign(idp_claims(user(), "o"))) == 401  # for some API, maybe not us


async def test_an_asymmetric_token_is_401_without_a_jwks(client: httpx.AsyncClient) -> None:
    token = new_key("RS256", "k1").sign(idp_claims(user(), "o", aud=None, iss=None))
    response = await client.get("/v1/chats", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401


def unsigned_token(header: dict[str, Any], claims: dict[str, Any], hmac_key: bytes | None) -> str:
    """A token built by hand, as an attacker would: PyJWT refuses to sign HS256 with a PEM key."""
    head = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=")
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=")
    signature = hmac.new(hmac_key, head + b"." + body, hashlib.sha256).digest() if hmac_key else b""
    return b".".join([head, body, base64.urlsafe_b64encode(signature).rstrip(b"=")]).decode()


@pytest.mark.parametrize(
    "forgery", ["hs256-with-public-pem", "hs256-with-public-jwk", "alg-none", "oct-key-in-jwks"]
)
async def test_a_public_key_is_never_an_hmac_secret_nor_none_an_algorithm(
    trusting: Callable[..., Any], jwks: JWKSServer, forgery: str
) -> None:
    key = new_key("RS256", "k1")
    jwks.keys = [key]
    jwks.extra = [SHARED_SECRET_JWK]
    claims = idp_claims(user(), "o")
    token = {
        "hs256-with-public-pem": unsigned_token({"alg": "HS256", "kid": "k1"}, claims, key.public_pem()),
        "hs256-with-public-jwk": unsigned_token(
            {"alg": "HS256", "kid": "k1"}, claims, json.dumps(key.jwk()).encode()
        ),
        "alg-none": unsigned_token({"alg": "none", "kid": "k1"}, claims, None),
        "oct-key-in-jwks": unsigned_token({"alg": "HS256", "kid": "shared"}, claims, SHARED_SECRET),
    }[forgery]
    async with trusting() as gateway:
        assert await gateway.status(key.sign(claims)) == 200
        assert await gateway.status(token) == 401


async def test_a_token_must_use_its_keys_own_algorithm(
    trusting: Callable[..., Any], jwks: JWKSServer
) -> None:
    rsa_key, ec_key = new_key("RS256", "rsa"), new_key("ES256", "ec")
    jwks.keys = [rsa_key, ec_key]
    async with trusting() as gateway:
        claims = idp_claims(user(), "o")
        signed_by_ec = jwt.encode(claims, ec_key.private, algorithm="ES256", headers={"kid": "rsa"})
        assert await gateway.status(signed_by_ec) == 401
        assert await gateway.status(ec_key.sign(claims)) == 200
