from __future__ import annotations

import httpx
import jwt
import pytest

from tests.conftest import JWT_SECRET, auth_headers


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


def test_a_verified_token_is_reused_only_until_it_expires() -> None:
    from gateway.auth import VerifiedTokens, mint_token

    now = [1_000_000.0]
    tokens = VerifiedTokens(JWT_SECRET, clock=lambda: now[0])
    token = jwt.encode({"sub": "u1", "org": "o1", "exp": 1_000_060}, JWT_SECRET)
    with pytest.raises(Exception, match="expired"):  # the real clock is far past this exp
        tokens.principal(token)
    fresh = mint_token(JWT_SECRET, "u2", "o2", ttl_s=60)
    assert tokens.principal(fresh).user_id == "u2"
    now[0] = float(jwt.decode(fresh, options={"verify_signature": False})["exp"]) - 1
    assert tokens.principal(fresh).org_id == "o2"  # cached, not yet expired
    now[0] += 2
    tokens.secret = "another-secret-" + "y" * 32  # a re-verification now fails: the entry was not used
    with pytest.raises(Exception, match="Invalid"):
        tokens.principal(fresh)
