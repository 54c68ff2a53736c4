"""The gateway's own token endpoint: client credentials, JWKS with two keys, refresh token
rotation with reuse detection, RFC 7009 revocation, RFC 7662 introspection, and the rate
limiting plugin in front of it."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import time
import tomllib
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.testing import PLUGWAY

GATEWAY_ISSUER = "https://gateway.test"
EXAMPLE = Path(__file__).resolve().parents[3] / "conf" / "examples" / "auth.toml"


@pytest.fixture(scope="module")
def client_secret() -> tuple[str, str]:
    """`plugway oauth-client new`: the secret and the configuration block with its hash."""
    result = subprocess.run([PLUGWAY, "oauth-client", "new", "--id", "billing", "--scopes", "orders:read,orders:write",
                             "--roles", "service"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    secret, block = lines[1], "\n".join(lines[lines.index("[[plugins.auth.token_endpoint.clients]]"):])
    assert secret.startswith("pwc_") and secret not in block and "scrypt$16384$8$1$" in block
    return secret, block


@pytest.fixture
def endpoint_config(auth_config, keys, tmp_path, client_secret):
    ec_file = tmp_path / "gw-ec.pem"
    ec_file.write_bytes(keys.private_pem(ec.generate_private_key(ec.SECP256R1())))
    rsa_file = tmp_path / "gw-rsa.pem"
    rsa_file.write_bytes(keys.private_pem(keys.rsa_other))

    signing_keys = {"ES256": f'{{ kid = "gw-2026", algorithm = "ES256", private_key = {{ file = "{ec_file}" }} }}',
                    "RS256": f'{{ kid = "gw-2025", algorithm = "RS256", private_key = {{ file = "{rsa_file}" }} }}'}

    def build(plugin: str = "", oauth_route: str = "", signing: str = "ES256") -> str:
        """Both keys published; ``signing`` names the one that signs (ES256: after the rotation)."""
        published = [signing_keys[signing]] + [key for name, key in signing_keys.items() if name != signing]
        return auth_config(f"""
            {plugin}
            [plugins.auth.token_endpoint]
            issuer = "{GATEWAY_ISSUER}"
            audience = ["orders-api"]
            refresh_token_ttl = "1h"
            signing_keys = [{", ".join(published)}]
            {client_secret[1]}
            [[plugins.auth.token_endpoint.clients]]
            id = "reports"
            secret_hash = "{client_secret[1].split('secret_hash = "')[1].split('"')[0]}"
            scopes = ["reports:read"]
        """, routes=f"""
            [[routes]]
            name = "oauth"
            prefix = "/oauth"
            upstream = "app"
            {oauth_route}
            [[routes]]
            name = "jwks"
            path = "/.well-known/jwks.json"
            upstream = "app"
        """)

    return build


def basic(client: str, secret: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{client}:{secret}".encode()).decode()}


async def post(gateway, path: str, form: dict | str, headers: dict | None = None):
    headers = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
    data = form if isinstance(form, str) else "&".join(f"{k}={v}" for k, v in form.items())
    async with gateway.client.post(path, data=data, headers=headers) as response:
        body = await response.json() if response.content_type == "application/json" else await response.read()
        return response.status, body, response.headers


async def api_status(gateway, token: str) -> int:
    async with gateway.client.get("/api/orders", headers={"Authorization": f"Bearer {token}"}) as response:
        return response.status


async def until_refused(gateway, token: str) -> float:
    """Seconds until refused; a request sent a second after the revocation must be refused."""
    started = time.monotonic()
    while True:
        sent = time.monotonic() - started
        if await api_status(gateway, token) != 200:
            return time.monotonic() - started
        assert sent < 1.0, "a request sent a second after its revocation was accepted"
        await asyncio.sleep(0.01)


async def published_claims(gateway, token: str) -> dict:
    """The token's claims, verified by PyJWT with the key the gateway publishes under its kid."""
    async with gateway.client.get("/.well-known/jwks.json") as response:
        jwks = await response.json()
    assert all("d" not in key for key in jwks["keys"])
    header = jwt.get_unverified_header(token)
    published = jwt.PyJWKSet.from_dict(jwks)[header["kid"]]
    return jwt.decode(token, published, algorithms=[header["alg"]], audience="orders-api", issuer=GATEWAY_ISSUER,
                      options={"require": ["exp", "iat", "jti"]})


async def test_client_credentials_tokens_work_on_routes_and_verify_against_the_published_keys(
        plugway_gateway, endpoint_config, client_secret, upstream):
    gateway = await plugway_gateway(endpoint_config())
    secret = client_secret[0]
    status, answer, headers = await post(gateway, "/oauth/token", {"grant_type": "client_credentials",
                                                                   "scope": "orders:read"}, basic("billing", secret))
    assert status == 200, answer
    assert headers["Cache-Control"] == "no-store" and headers["Pragma"] == "no-cache"
    assert (answer["token_type"], answer["expires_in"], answer["scope"]) == ("Bearer", 300, "orders:read")
    async with gateway.client.get("/.well-known/jwks.json") as response:
        jwks = await response.json()
    assert [key["kid"] for key in jwks["keys"]] == ["gw-2026", "gw-2025"]  # both published during a rotation
    header = jwt.get_unverified_header(answer["access_token"])
    assert (header["kid"], header["alg"], header["typ"]) == ("gw-2026", "ES256", "at+jwt")
    claims = await published_claims(gateway, answer["access_token"])
    assert (claims["sub"], claims["client_id"], claims["exp"] - claims["iat"]) == ("billing", "billing", 300)
    assert await api_status(gateway, answer["access_token"]) == 200
    seen = upstream.requests[-1]["headers"]
    assert (seen["X-Consumer-ID"], seen["X-Consumer-Roles"], seen["X-Consumer-Scopes"]) == (
        "billing", "service", "orders:read")
    status, answer, _ = await post(gateway, "/oauth/token", {"grant_type": "client_credentials", "client_id": "billing",
                                                             "client_secret": secret})
    assert status == 200 and answer["scope"] == "orders:read orders:write" and "refresh_token" in answer
    assert not any(r["path"].startswith(("/oauth", "/.well-known")) for r in upstream.requests)


async def test_rs256_signing_and_tokens_of_the_previous_key_after_a_rotation(plugway_gateway, endpoint_config,
                                                                              client_secret, keys):
    """Before the rotation the RS256 key signs; after it the ES256 key does, and the RS256 key,
    still published, keeps the tokens it signed valid until they expire."""
    auth, grant = basic("billing", client_secret[0]), {"grant_type": "client_credentials"}
    before = await plugway_gateway(endpoint_config(signing="RS256"))
    token = (await post(before, "/oauth/token", grant, auth))[1]["access_token"]
    header = jwt.get_unverified_header(token)
    assert (header["alg"], header["kid"], header["typ"]) == ("RS256", "gw-2025", "at+jwt")
    claims = await published_claims(before, token)
    assert (claims["sub"], claims["roles"]) == ("billing", ["service"])
    assert await api_status(before, token) == 200
    after = await plugway_gateway(endpoint_config(signing="ES256"))
    assert await api_status(after, token) == 200  # published, no longer signing
    new_token = (await post(after, "/oauth/token", grant, auth))[1]["access_token"]
    assert jwt.get_unverified_header(new_token)["alg"] == "ES256"
    assert (await published_claims(after, new_token))["sub"] == "billing"
    forged = jwt.encode(claims, keys.rsa, algorithm="RS256", headers={"kid": "gw-2025", "typ": "at+jwt"})
    assert await api_status(after, forged) == 401  # the same claims and kid, signed by a key never published


async def test_client_authentication_and_request_errors(plugway_gateway, endpoint_config, client_secret):
    gateway = await plugway_gateway(endpoint_config())
    secret = client_secret[0]
    grant = {"grant_type": "client_credentials"}
    status, answer, headers = await post(gateway, "/oauth/token", grant, basic("billing", secret + "x"))
    assert (status, answer["error"]) == (401, "invalid_client")
    assert headers["WWW-Authenticate"] == 'Basic realm="plugway"' and secret not in str(answer)
    for form, headers, expected in (
        ({**grant, "client_id": "billing", "client_secret": "wrong"}, {}, (401, "invalid_client")),
        ({**grant, "client_id": "nobody", "client_secret": secret}, {}, (401, "invalid_client")),
        (grant, {}, (401, "invalid_client")),
        ({**grant, "client_secret": secret}, basic("billing", secret), (400, "invalid_request")),
        ({"grant_type": "password", "username": "a", "password": "b"}, basic("billing", secret),
         (400, "unsupported_grant_type")),
        ({"grant_type": "refresh_token", "refresh_token": "rt_nothing"}, basic("billing", secret),
         (400, "invalid_grant")),
        ({**grant, "scope": "reports:read"}, basic("billing", secret), (400, "invalid_scope")),
        ("grant_type=client_credentials&grant_type=client_credentials", basic("billing", secret),
         (400, "invalid_request")),
        ({}, basic("billing", secret), (400, "invalid_request")),
    ):
        status, answer, _ = await post(gateway, "/oauth/token", form, headers)
        assert (status, answer["error"]) == expected, (form, answer)
    async with gateway.client.post("/oauth/token", json=grant, headers=basic("billing", secret)) as response:
        assert response.status == 400 and (await response.json())["error"] == "invalid_request"
    async with gateway.client.get("/oauth/token") as response:
        assert response.status == 405 and response.headers["Allow"] == "POST"
    assert gateway.metric("plugway_auth_token_endpoint_requests_total", endpoint="token", result="invalid_client") == 4


async def test_refresh_tokens_rotate_and_a_reused_one_revokes_the_whole_family(plugway_gateway, endpoint_config,
                                                                               client_secret):
    gateway = await plugway_gateway(endpoint_config())
    auth = basic("billing", client_secret[0])
    _, first, _ = await post(gateway, "/oauth/token", {"grant_type": "client_credentials"}, auth)
    status, second, _ = await post(gateway, "/oauth/token", {"grant_type": "refresh_token",
                                                             "refresh_token": first["refresh_token"]}, auth)
    assert status == 200 and second["refresh_token"] != first["refresh_token"]
    assert second["scope"] == first["scope"]
    _, narrowed, _ = await post(gateway, "/oauth/token", {"grant_type": "refresh_token", "scope": "orders:read",
                                                          "refresh_token": second["refresh_token"]}, auth)
    assert narrowed["scope"] == "orders:read"
    for answer in (first, second, narrowed):
        assert await api_status(gateway, answer["access_token"]) == 200
    # The first refresh token again: a stolen copy is being replayed. Everything of the family dies.
    status, answer, _ = await post(gateway, "/oauth/token", {"grant_type": "refresh_token",
                                                             "refresh_token": first["refresh_token"]}, auth)
    assert (status, answer["error"]) == (400, "invalid_grant")
    status, answer, _ = await post(gateway, "/oauth/token", {"grant_type": "refresh_token",
                                                             "refresh_token": narrowed["refresh_token"]}, auth)
    assert (status, answer["error"]) == (400, "invalid_grant")
    for answer in (first, second, narrowed):
        await until_refused(gateway, answer["access_token"])
    assert gateway.metric("plugway_auth_token_endpoint_requests_total", endpoint="token", result="refresh_reused") == 1
    _, fresh, _ = await post(gateway, "/oauth/token", {"grant_type": "client_credentials"}, auth)
    assert await api_status(gateway, fresh["access_token"]) == 200  # a new grant is a new family


async def test_a_refresh_token_is_bound_to_its_client(plugway_gateway, endpoint_config, client_secret):
    gateway = await plugway_gateway(endpoint_config())
    _, tokens, _ = await post(gateway, "/oauth/token", {"grant_type": "client_credentials"},
                              basic("billing", client_secret[0]))
    status, answer, _ = await post(gateway, "/oauth/token", {"grant_type": "refresh_token",
                                                             "refresh_token": tokens["refresh_token"]},
                                   basic("reports", client_secret[0]))
    assert (status, answer["error"]) == (400, "invalid_grant")


async def test_revocation_endpoint_rfc_7009(plugway_gateway, endpoint_config, client_secret):
    gateway = await plugway_gateway(endpoint_config())
    billing, reports = basic("billing", client_secret[0]), basic("reports", client_secret[0])
    _, tokens, _ = await post(gateway, "/oauth/token", {"grant_type": "client_credentials"}, billing)
    status, body, _ = await post(gateway, "/oauth/revoke", {"token": tokens["access_token"]}, reports)
    assert (status, body) == (200, b"")  # another client's token: the same answer, nothing revoked
    assert await api_status(gateway, tokens["access_token"]) == 200
    status, body, _ = await post(gateway, "/oauth/revoke", {"token": tokens["access_token"],
                                                            "token_type_hint": "access_token"}, billing)
    assert status == 200
    await until_refused(gateway, tokens["access_token"])
    assert (await post(gateway, "/oauth/revoke", {"token": tokens["refresh_token"]}, billing))[0] == 200
    status, answer, _ = await post(gateway, "/oauth/token", {"grant_type": "refresh_token",
                                                             "refresh_token": tokens["refresh_token"]}, billing)
    assert (status, answer["error"]) == (400, "invalid_grant")
    assert (await post(gateway, "/oauth/revoke", {"token": "garbage"}, billing))[0] == 200
    assert (await post(gateway, "/oauth/revoke", {"token": "garbage"}))[0] == 401


async def test_introspection_rfc_7662(plugway_gateway, endpoint_config, client_secret):
    gateway = await plugway_gateway(endpoint_config())
    billing, reports = basic("billing", client_secret[0]), basic("reports", client_secret[0])
    _, tokens, _ = await post(gateway, "/oauth/token", {"grant_type": "client_credentials",
                                                        "scope": "orders:write"}, billing)
    status, answer, _ = await post(gateway, "/oauth/introspect", {"token": tokens["access_token"]}, reports)
    assert status == 200 and answer["active"] is True
    assert (answer["client_id"], answer["scope"], answer["iss"], answer["aud"]) == (
        "billing", "orders:write", GATEWAY_ISSUER, "orders-api")
    _, answer, _ = await post(gateway, "/oauth/introspect", {"token": tokens["refresh_token"]}, reports)
    assert answer["active"] is True and answer["token_type"] == "refresh_token"
    await post(gateway, "/oauth/revoke", {"token": tokens["access_token"]}, billing)
    _, answer, _ = await post(gateway, "/oauth/introspect", {"token": tokens["access_token"]}, reports)
    assert answer == {"active": False}
    for token in ("garbage", tokens["access_token"] + "x", "rt_unknown"):
        _, answer, _ = await post(gateway, "/oauth/introspect", {"token": token}, reports)
        assert answer == {"active": False}
    assert (await post(gateway, "/oauth/introspect", {"token": tokens["refresh_token"]}))[0] == 401


def example_limits(route: str) -> str:
    """The rate limits of a route in the token endpoint block of conf/examples/auth.toml (commented
    out there), as [[routes.plugins.ratelimit.limits]] tables."""
    text = EXAMPLE.read_text()
    block = text[text.index("# [[routes]]"):text.index("# --- end of the token endpoint")]
    table = tomllib.loads("\n".join(line[2:] if line.startswith("# ") else "" for line in block.splitlines()))
    limits = next(r for r in table["routes"] if r["name"] == route)["plugins"]["ratelimit"]["limits"]
    return "\n".join("[[routes.plugins.ratelimit.limits]]\n" + "\n".join(f"{name} = {json.dumps(value)}"
                                                                        for name, value in limit.items())
                     for limit in limits)


async def test_the_example_rate_limits_the_token_endpoint_per_client_and_guesses_per_address(
        plugway_gateway, endpoint_config, client_secret):
    """conf/examples/auth.toml: 5 token requests per 15 minutes per client (its Basic credentials),
    and 30 per 15 minutes per address, which is what limits guesses: each wrong secret is a new
    Authorization value, a new client for the first limit."""
    limits = example_limits("oauth-token")
    assert 'key = "header:Authorization"\nrate = "5/15m"' in limits and 'key = "ip"\nrate = "30/15m"' in limits
    gateway = await plugway_gateway(endpoint_config(oauth_route=limits))
    started = time.monotonic()

    async def statuses(client: str, secret: str, times: int = 1) -> list[int]:
        return [(await post(gateway, "/oauth/token", {"grant_type": "client_credentials"}, basic(client, secret)))[0]
                for _ in range(times)]

    assert await statuses("billing", client_secret[0], 6) == [200] * 5 + [429]
    assert await statuses("reports", client_secret[0], 6) == [200] * 5 + [429]  # its own 5
    assert await statuses("billing", client_secret[0]) == [429]
    guesses: list[int] = []
    while 429 not in guesses:
        guesses += await statuses("billing", f"guess-{len(guesses)}")
    # 30 for the address, 10 of them taken above (refused requests count for no limit), plus what
    # the bucket refilled meanwhile (one every 30 s)
    assert set(guesses[:-1]) == {401} and 20 <= len(guesses) - 1 <= 20 + (time.monotonic() - started) / 30
    assert gateway.metric("plugway_auth_token_endpoint_requests_total", endpoint="token",
                          result="invalid_client") == len(guesses) - 1  # the refused guess was never checked
