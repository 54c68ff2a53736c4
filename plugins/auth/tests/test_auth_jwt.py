"""JWT validation on a real gateway, with real keys and real signed tokens: every algorithm,
every claim check, and each attack of the issue refused in its own test."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time

import pytest

from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from gateway.testing import free_port


async def call(gateway, token: str | None = None, path: str = "/api/orders", headers: dict | None = None):
    headers = dict(headers or {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with gateway.client.get(path, headers=headers) as response:
        body = await response.read()
        return response.status, body, response.headers


def assert_refused(gateway, result, reason: str, description: str | None = None) -> dict:
    status, body, headers = result
    assert status == 401, (status, body)
    error = json.loads(body)["error"]
    assert error["status"] == 401 and error["request_id"] == headers["X-Request-ID"]
    challenge = headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="plugway", error="invalid_token", error_description="')
    if description is not None:
        assert f'error_description="{description}"' in challenge and error["message"] == description
    assert gateway.metric("plugway_auth_failures_total", reason=reason) >= 1
    return error


@pytest.fixture
async def rs_gateway(plugway_gateway, auth_config, key_files, rs256_plugin):
    return await plugway_gateway(auth_config(rs256_plugin()))


async def test_a_valid_token_reaches_the_upstream_with_the_identity_headers(rs_gateway, keys, sign, upstream):
    status, body, _ = await call(rs_gateway, sign(keys.rsa, "RS256", roles=["reader", "writer"], scope="a b"))
    assert status == 200
    seen = upstream.requests[-1]["headers"]
    assert seen["X-Consumer-ID"] == "alice"
    assert seen["X-Consumer-Roles"] == "reader,writer"
    assert seen["X-Consumer-Scopes"] == "a b"
    assert "Authorization" in seen  # forwarded unless hide_credentials


ALGORITHMS = [
    ("HS256", "hmac"), ("HS384", "hmac"), ("HS512", "hmac"), ("RS256", "rsa"), ("RS384", "rsa"), ("RS512", "rsa"),
    ("PS256", "rsa"), ("ES256", "ec256"), ("ES384", "ec384"), ("EdDSA", "ed25519"),
]


@pytest.mark.parametrize("alg, key_name", ALGORITHMS)
async def test_every_supported_algorithm_with_a_real_key(plugway_gateway, auth_config, keys, key_files, sign,
                                                         alg, key_name):
    if key_name == "hmac":
        source = f'hmac_keys = [{{ secret = {{ file = "{key_files["hmac"]}" }} }}]'
        signing_key = keys.hmac
    else:
        source = f'public_keys = [{{ file = "{key_files[key_name]}" }}]'
        signing_key = getattr(keys, key_name)
    gateway = await plugway_gateway(auth_config(f"""
        [[plugins.auth.issuers]]
        name = "idp"
        issuer = "{sign.issuer}"
        algorithms = ["{alg}"]
        {source}
    """))
    assert (await call(gateway, sign(signing_key, alg)))[0] == 200
    impostor = {
        "hmac": b"another-secret-that-is-long-enough-for-hs512-0123456789-0123456789", "rsa": keys.rsa_other,
        "ec256": ec.generate_private_key(ec.SECP256R1()), "ec384": ec.generate_private_key(ec.SECP384R1()),
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
    }[key_name]
    assert_refused(gateway, await call(gateway, sign(impostor, alg)), "bad_signature")


async def test_alg_none_is_refused(rs_gateway, sign):
    claims = sign.claims()
    for token in (sign.raw({"alg": "none", "typ": "JWT"}, claims), sign.raw({"alg": "none"}, claims, b"sig"),
                  sign.raw({"alg": "None"}, claims)):
        assert_refused(rs_gateway, await call(rs_gateway, token), "algorithm", "the token's algorithm is not accepted")


async def test_hs256_signed_with_the_rsa_public_key_is_refused(rs_gateway, keys, sign):
    """The classic key confusion: the verifier's RSA public key used as an HMAC secret."""
    pem = keys.public_pem(keys.rsa)
    header, claims = {"alg": "HS256", "typ": "JWT", "kid": "k1"}, sign.claims(sub="admin")
    unsigned = sign.raw(header, claims).rsplit(".", 1)[0]
    for secret in (pem, pem.strip(), json.dumps(keys.jwk(keys.rsa, "k1", "RS256")).encode()):
        signature = hmac.new(secret, unsigned.encode(), hashlib.sha256).digest()
        token = sign.raw(header, claims, signature)
        assert_refused(rs_gateway, await call(rs_gateway, token), "algorithm")


async def test_an_rsa_key_is_never_an_hmac_secret_even_when_the_issuer_takes_both(plugway_gateway, auth_config,
                                                                                   keys, key_files, sign, rs256_plugin):
    """Two issuers, one HMAC and one RSA: a token claiming the RSA issuer with HS256 is refused, and
    one claiming the HMAC issuer signed with the RSA public key as secret fails its signature."""
    gateway = await plugway_gateway(auth_config(rs256_plugin() + f"""
        [[plugins.auth.issuers]]
        name = "internal"
        issuer = "https://internal.test"
        algorithms = ["HS256"]
        hmac_keys = [{{ secret = {{ file = "{key_files['hmac']}" }} }}]
    """))
    pem = keys.public_pem(keys.rsa)
    for iss, reason in ((sign.issuer, "algorithm"), ("https://internal.test", "bad_signature")):
        header, claims = {"alg": "HS256", "kid": "k1"}, sign.claims(iss=iss, aud=sign.audience)
        unsigned = sign.raw(header, claims).rsplit(".", 1)[0]
        token = sign.raw(header, claims, hmac.new(pem, unsigned.encode(), hashlib.sha256).digest())
        assert_refused(gateway, await call(gateway, token), reason)
    assert (await call(gateway, sign(keys.hmac, "HS256", iss="https://internal.test")))[0] == 200
    assert (await call(gateway, sign(keys.rsa, "RS256")))[0] == 200


async def test_an_expired_token_is_refused_beyond_the_leeway(rs_gateway, keys, sign):
    now = int(time.time())
    assert_refused(rs_gateway, await call(rs_gateway, sign(keys.rsa, "RS256", iat=now - 200, exp=now - 60)),
                   "expired", "the token has expired")
    assert (await call(rs_gateway, sign(keys.rsa, "RS256", iat=now - 200, exp=now - 10)))[0] == 200  # within 30 s


async def test_a_token_not_yet_valid_is_refused(rs_gateway, keys, sign):
    now = int(time.time())
    assert_refused(rs_gateway, await call(rs_gateway, sign(keys.rsa, "RS256", nbf=now + 120)), "not_yet_valid",
                   "the token is not valid yet")
    assert_refused(rs_gateway, await call(rs_gateway, sign(keys.rsa, "RS256", iat=now + 120, exp=now + 300)),
                   "not_yet_valid")
    assert (await call(rs_gateway, sign(keys.rsa, "RS256", nbf=now + 10)))[0] == 200  # within the leeway


async def test_a_wrong_or_missing_audience_is_refused(rs_gateway, keys, sign):
    for aud in ("billing-api", ["billing-api", "other"], None, 5):
        assert_refused(rs_gateway, await call(rs_gateway, sign(keys.rsa, "RS256", aud=aud)), "invalid_claims")
    assert (await call(rs_gateway, sign(keys.rsa, "RS256", aud=["billing-api", sign.audience])))[0] == 200


async def test_a_wrong_issuer_is_refused(rs_gateway, keys, sign):
    for iss in ("https://evil.test/", sign.issuer.rstrip("/"), sign.issuer + "x", None):
        assert_refused(rs_gateway, await call(rs_gateway, sign(keys.rsa, "RS256", iss=iss)), "unknown_issuer")


async def test_an_unknown_kid_is_refused(rs_gateway, keys, sign):
    assert_refused(rs_gateway, await call(rs_gateway, sign(keys.rsa, "RS256", kid="k2")), "unknown_key",
                   "the token's signing key is unknown")
    assert_refused(rs_gateway, await call(rs_gateway, sign(keys.rsa, "RS256", kid="../../dev/null")), "unknown_key")


MALFORMED = [
    "abc", "abc.def", "a.b.c.d", "..", "eyJhbGciOiJSUzI1NiJ9..", "!!!.abc.def", "eyJhbGciOiJSUzI1NiJ9.e30=.abc",
    "eyJhbGciOiJSUzI1NiJ9.e30.a", "e30.e30.abc", "bm90IGpzb24.e30.abc", "WzFd.e30.abc", "eyJhbGciOjF9.e30.abc",
    "eyJhbGciOiJSUzI1NiJ9.WzFd.abc", "eyJhbGciOiJSUzI1NiJ9.e30.a+b/", "eyJhbGciOiJSUzI1NiJ9.e30.abc%3D",
    "eyJhbGciOiJSUzI1NiJ9.eyJleHAiOk5hTn0.abc", "eyJhbGciOiJSUzI1NiJ9.eyJhIjoxLCJhIjoyfQ.abc", "ÿÿÿ.e30.abc",
]


@pytest.mark.parametrize("token", MALFORMED)
async def test_malformed_segments_and_bad_base64_are_refused(rs_gateway, token):
    error = assert_refused(rs_gateway, await call(rs_gateway, token), "malformed", "the token is malformed")
    assert token not in json.dumps(error)


async def test_a_crit_header_is_refused(rs_gateway, keys, sign):
    token = sign(keys.rsa, "RS256", headers={"crit": ["exp"], "exp": 1})
    assert_refused(rs_gateway, await call(rs_gateway, token), "malformed")


async def test_a_megabyte_token_never_reaches_the_plugin_or_the_upstream(rs_gateway, keys, sign, upstream):
    token = sign(keys.rsa, "RS256", pad="A" * 1_000_000)
    status, _, _ = await call(rs_gateway, token)
    assert status == 431  # the core's header limit comes first
    async with rs_gateway.client.get("/api/x", params={"t": token}) as response:
        assert response.status == 414
    assert upstream.requests == []


async def test_tokens_over_max_token_size_are_refused_before_parsing(plugway_gateway, auth_config, key_files, keys,
                                                                     sign, rs256_plugin):
    gateway = await plugway_gateway(auth_config(rs256_plugin('max_token_size = "2KiB"')))
    token = sign(keys.rsa, "RS256", pad="A" * 4000)
    assert len(token) < 8000
    assert_refused(gateway, await call(gateway, token), "too_large", "the token is too large")
    assert gateway.metric("plugway_auth_failures_total", reason="malformed") == 0


async def test_exp_is_required_numeric_and_bounded_by_max_lifetime(rs_gateway, keys, sign):
    now = int(time.time())
    for exp in (None, str(now + 60), 1e300, now + 2 * 86400, True):
        assert_refused(rs_gateway, await call(rs_gateway, sign(keys.rsa, "RS256", exp=exp)), "invalid_claims")
    assert_refused(rs_gateway, await call(rs_gateway, sign(keys.rsa, "RS256", iat=None, exp=now + 2 * 86400)),
                   "invalid_claims")
    assert_refused(rs_gateway, await call(rs_gateway, sign(keys.rsa, "RS256", nbf="soon")), "invalid_claims")
    assert (await call(rs_gateway, sign(keys.rsa, "RS256", exp=now + 3600.5)))[0] == 200


async def test_typ_is_checked_when_configured(plugway_gateway, auth_config, key_files, keys, sign, rs256_plugin):
    gateway = await plugway_gateway(auth_config(rs256_plugin().replace(
        'algorithms = ["RS256"]', 'algorithms = ["RS256"]\ntyp = "at+jwt"')))
    assert_refused(gateway, await call(gateway, sign(keys.rsa, "RS256")), "invalid_claims")  # PyJWT's typ: JWT
    for typ in ("at+jwt", "AT+JWT", "application/at+jwt"):
        assert (await call(gateway, sign(keys.rsa, "RS256", headers={"typ": typ})))[0] == 200


async def test_required_claims_and_claim_values_for_headers_are_checked(plugway_gateway, auth_config, key_files,
                                                                        keys, sign, upstream, rs256_plugin):
    gateway = await plugway_gateway(auth_config(rs256_plugin("""
        claim_headers = { X-Consumer-Username = "name" }
    """).replace('algorithms = ["RS256"]', 'algorithms = ["RS256"]\nrequired_claims = ["exp", "jti", "name"]'),
        server='identity_headers = ["X-Consumer-ID", "X-Consumer-Roles", "X-Consumer-Scopes", "X-Consumer-Username"]'))
    assert (await call(gateway, sign(keys.rsa, "RS256", name="Alice A.")))[0] == 200
    assert upstream.requests[-1]["headers"]["X-Consumer-Username"] == "Alice A."
    assert_refused(gateway, await call(gateway, sign(keys.rsa, "RS256")), "invalid_claims")  # no name
    for bad in ({"name": "bob\r\nX-Admin: 1"}, {"name": "x\x00"}, {"sub": "bob\nX-Admin: 1", "name": "b"},
                {"roles": ["admin\r\n"], "name": "b"}, {"roles": ["a,b"], "name": "b"}, {"scope": ["a b"], "name": "b"},
                {"sub": "anonymous", "name": "b"}, {"sub": 42, "name": "b"}, {"name": "é"}):
        assert_refused(gateway, await call(gateway, sign(keys.rsa, "RS256", **bad)), "invalid_claims")
    assert len(upstream.requests) == 1


async def test_roles_from_a_nested_claim(plugway_gateway, auth_config, key_files, keys, sign, upstream, rs256_plugin):
    gateway = await plugway_gateway(auth_config(rs256_plugin().replace(
        'algorithms = ["RS256"]', 'algorithms = ["RS256"]\nroles_claim = "realm_access.roles"\nscopes_claim = "scp"')))
    token = sign(keys.rsa, "RS256", realm_access={"roles": ["admin", "ops"]}, scp=["orders:write"])
    assert (await call(gateway, token))[0] == 200
    assert upstream.requests[-1]["headers"]["X-Consumer-Roles"] == "admin,ops"
    assert upstream.requests[-1]["headers"]["X-Consumer-Scopes"] == "orders:write"


async def test_a_client_cannot_send_identity_headers_on_any_route(rs_gateway, keys, sign, upstream):
    spoofed = {"X-Consumer-ID": "admin", "x-consumer-roles": "admin", "X_Consumer_ID": "admin",
               "X-Consumer-Scopes": "*"}
    assert (await call(rs_gateway, sign(keys.rsa, "RS256"), headers=spoofed))[0] == 200
    assert (await call(rs_gateway, path="/public/x", headers=spoofed))[0] == 200
    assert (await call(rs_gateway, path="/open/x", headers=spoofed))[0] == 200
    authenticated, anonymous, unauthenticated = (record["raw_headers"] for record in upstream.requests)
    assert [v for n, v in authenticated if n.lower() == "x-consumer-id"] == ["alice"]
    assert [v for n, v in anonymous if n.lower() == "x-consumer-id"] == ["anonymous"]
    for raw in (authenticated, anonymous, unauthenticated):
        names = {n.lower() for n, _ in raw}
        assert "x_consumer_id" not in names and ("x-consumer-roles", "admin") not in [(n.lower(), v) for n, v in raw]
    assert "x-consumer-id" not in {n.lower() for n, _ in unauthenticated}
    assert (await call(rs_gateway, headers=spoofed))[0] == 401  # and on /api it identifies nobody


async def test_path_tricks_cannot_reach_the_protected_route_as_anonymous(rs_gateway, upstream):
    """/public allows anonymous; /api requires a token. Canonicalisation happens before routing,
    so every spelling of /api/admin is routed (and authenticated) as /api/admin."""
    for path in ("/public/../api/admin", "/public/%2e%2e/api/admin", "/public/%2E%2E/api/admin",
                 "/public/./../api/admin", "//api/admin", "/public//../../api/admin", "/%61pi/admin",
                 "/public/..%2fapi/admin", "/public/%252e%252e/api/admin", "/public/..;/api/admin",
                 "/public/..\\api/admin"):
        reader, writer = await asyncio.open_connection("127.0.0.1", rs_gateway.port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".encode())
        answer = await reader.read(-1)
        writer.close()
        status = int(answer[9:12])
        assert status in (400, 401), (path, answer[:200])
    assert [r for r in upstream.requests if "admin" in r["path"]] == []


async def test_anonymous_access_is_per_route_and_invalid_credentials_are_not_anonymous(rs_gateway, upstream):
    status, _, _ = await call(rs_gateway, path="/public/x")
    assert status == 200 and upstream.requests[-1]["headers"]["X-Consumer-ID"] == "anonymous"
    status, body, headers = await call(rs_gateway)
    assert status == 401 and headers["WWW-Authenticate"] == 'Bearer realm="plugway"'  # RFC 6750: no error code
    assert json.loads(body)["error"]["code"] == "missing_credentials"
    assert rs_gateway.metric("plugway_auth_failures_total", reason="missing") == 1
    assert_refused(rs_gateway, await call(rs_gateway, "not-a-token", path="/public/x"), "malformed")


async def test_token_sources_header_cookie_query_and_subprotocol(plugway_gateway, auth_config, key_files, keys, sign,
                                                                 upstream, rs256_plugin):
    gateway = await plugway_gateway(auth_config(rs256_plugin(
        'token_sources = ["bearer", "header:X-Token", "cookie:session", "query:access_token", "subprotocol"]')))
    token = sign(keys.rsa, "RS256")
    for headers, path in (({"X-Token": token}, "/api/x"), ({"Cookie": f"theme=dark; session={token}"}, "/api/x"),
                          ({}, f"/api/x?a=1&access_token={token}"),
                          ({"Sec-WebSocket-Protocol": f"bearer.{token}, chat.v1"}, "/api/x")):
        assert (await call(gateway, path=path, headers=headers))[0] == 200
    assert upstream.requests[-1]["headers"]["Sec-WebSocket-Protocol"] == "chat.v1"  # the token entry removed
    other = sign(keys.rsa, "RS256", sub="bob")
    assert_refused(gateway, await call(gateway, token, headers={"Cookie": f"session={other}"}), "ambiguous")
    assert (await call(gateway, token, headers={"Cookie": f"session={token}"}))[0] == 200  # the same token twice
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(f"GET /api/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n"
                 f"Authorization: Bearer {other}\r\nConnection: close\r\n\r\n".encode())
    assert (await reader.read(-1)).startswith(b"HTTP/1.1 401")
    writer.close()


async def test_hide_credentials_removes_them_from_the_upstream_request(plugway_gateway, auth_config, key_files, keys,
                                                                       sign, upstream, rs256_plugin):
    gateway = await plugway_gateway(auth_config(rs256_plugin(
        'hide_credentials = true\ntoken_sources = ["bearer", "query:access_token", "cookie:session"]')))
    token = sign(keys.rsa, "RS256")
    assert (await call(gateway, token))[0] == 200
    assert "Authorization" not in upstream.requests[-1]["headers"]
    assert (await call(gateway, path=f"/api/x?a=1&access_token={token}&b=2"))[0] == 200
    assert upstream.requests[-1]["path"] == "/api/x?a=1&b=2"
    assert (await call(gateway, headers={"Cookie": f"theme=dark; session={token}"}))[0] == 200
    assert upstream.requests[-1]["headers"]["Cookie"] == "theme=dark"


async def test_several_issuers_at_once(plugway_gateway, auth_config, key_files, keys, sign, upstream, rs256_plugin):
    gateway = await plugway_gateway(auth_config(rs256_plugin() + f"""
        [[plugins.auth.issuers]]
        name = "partners"
        issuer = "https://partners.test"
        algorithms = ["ES256"]
        consumer_claim = "client_id"
        public_keys = [{{ file = "{key_files['ec256']}" }}]
        [[plugins.auth.issuers]]
        name = "legacy"
        algorithms = ["HS512"]
        hmac_keys = [{{ secret = {{ file = "{key_files['hmac']}" }}, kid = "2026" }}]
    """))
    assert (await call(gateway, sign(keys.rsa, "RS256")))[0] == 200
    assert (await call(gateway, sign(keys.ec256, "ES256", iss="https://partners.test", client_id="acme")))[0] == 200
    assert upstream.requests[-1]["headers"]["X-Consumer-ID"] == "acme"
    assert (await call(gateway, sign(keys.hmac, "HS512", iss=None, kid="2026", aud=None)))[0] == 200
    assert (await call(gateway, sign(keys.hmac, "HS512", iss="https://unknown.test", kid="2026")))[0] == 200
    assert_refused(gateway, await call(gateway, sign(keys.hmac, "HS512", kid="2025")), "algorithm")  # iss: the RSA one
    assert_refused(gateway, await call(gateway, sign(keys.hmac, "HS512", iss=None, kid="2025")), "unknown_key")
    assert_refused(gateway, await call(gateway, sign(keys.ec256, "ES256", client_id="acme")), "algorithm")


def verifications(gateway) -> float:
    return gateway.metric("plugway_auth_token_verifications_total")


async def test_the_verified_token_cache_honours_exp(plugway_gateway, auth_config, key_files, keys, sign, rs256_plugin):
    gateway = await plugway_gateway(auth_config(rs256_plugin('leeway = "0s"')))
    for lifetime in (3, 6, 12, 24):  # a machine too busy to answer twice before exp: a longer-lived token
        exp = int(time.time()) + lifetime
        token = sign(keys.rsa, "RS256", iat=exp - lifetime, exp=exp)
        checked = verifications(gateway)
        statuses = [(await call(gateway, token))[0] for _ in range(2)]
        if time.time() < exp:  # both answered before exp
            break
    assert statuses == [200, 200] and verifications(gateway) == checked + 1  # the second from the cache
    while True:  # until refused: never accepted when sent after exp, never refused before it
        sent = time.time()
        result = await call(gateway, token)
        if result[0] != 200:
            break
        assert sent <= exp, "a request sent after exp was accepted"
        await asyncio.sleep(0.05)
    assert time.time() > exp
    assert_refused(gateway, result, "expired")


async def test_the_verified_token_cache_drops_its_oldest_entry_at_cache_size(plugway_gateway, auth_config, key_files,
                                                                             keys, sign, rs256_plugin):
    gateway = await plugway_gateway(auth_config(rs256_plugin("cache_size = 2")))
    first, second, third = (sign(keys.rsa, "RS256", jti=f"token-{n}") for n in range(3))

    async def checked_after(*tokens: str) -> float:
        for token in tokens:
            assert (await call(gateway, token))[0] == 200
        return verifications(gateway)

    assert await checked_after(first, second, first, second) == 2  # two entries: both held
    assert await checked_after(third) == 3  # a third: the oldest entry (first) goes
    assert await checked_after(second, third) == 3
    assert await checked_after(first) == 4  # checked in full again
    uncached = await plugway_gateway(auth_config(rs256_plugin("cache_size = 0")))
    for _ in range(3):
        assert (await call(uncached, first))[0] == 200
    assert verifications(uncached) == 3


async def revoke(gateway, body: dict, token: str | None = None) -> tuple[int, dict]:
    async with gateway.client.post(f"{gateway.admin_url}/auth/revocations", json=body) as response:
        return response.status, await response.json()


async def refused_within_a_second(gateway, token: str) -> None:
    """A request sent a second after the revocation (handled later still) must be refused."""
    started = time.monotonic()
    while True:
        sent = time.monotonic() - started
        if (await call(gateway, token))[0] != 200:
            return
        assert sent < 1.0, "a request sent a second after the revocation was accepted"


async def test_revocation_by_jti_and_by_consumer_through_the_admin_api(rs_gateway, keys, sign):
    token = sign(keys.rsa, "RS256", jti="token-1")
    other = sign(keys.rsa, "RS256", jti="token-2")
    assert (await call(rs_gateway, token))[0] == 200
    status, answer = await revoke(rs_gateway, {"jti": "token-1", "expires_at": time.time() + 300})
    assert status == 200 and answer["revoked"] == {"jti": "token-1"} and 320 < answer["ttl"] <= 331  # + leeway
    await refused_within_a_second(rs_gateway, token)
    assert_refused(rs_gateway, await call(rs_gateway, token), "revoked", "the token has been revoked")
    assert (await call(rs_gateway, other))[0] == 200
    status, answer = await revoke(rs_gateway, {"consumer": "alice"})
    assert status == 200 and answer["revoked"]["consumer"] == "alice"
    await refused_within_a_second(rs_gateway, other)
    later = sign(keys.rsa, "RS256", iat=int(time.time()) + 2)  # issued after the revocation
    assert (await call(rs_gateway, later))[0] == 200
    assert (await call(rs_gateway, sign(keys.rsa, "RS256", sub="bob")))[0] == 200
    for bad in ({}, {"jti": ""}, {"jti": "x", "consumer": "y"}, {"consumer": "a", "before": "now"}, [1]):
        assert (await revoke(rs_gateway, bad))[0] == 400


def kept_until(redis, key: str) -> tuple[float, float]:
    """When the store forgets a key: the Unix times between which its expiry falls."""
    before = time.time()
    milliseconds = int(redis.cli("pttl", "plugway:" + key))
    after = time.time()
    assert milliseconds > 0, (key, milliseconds)
    return before + milliseconds / 1000, after + (milliseconds + 1) / 1000


async def test_revocations_are_kept_in_the_store_as_long_as_the_tokens_they_cover(
        plugway_gateway, auth_config, key_files, rs256_plugin, redis_server):
    from plugway_auth.revocation import consumer_key, token_key

    redis = redis_server()
    store = f'[store]\nbackend = "redis"\nurl = "{redis.url}"\n'
    gateway = await plugway_gateway(auth_config(rs256_plugin('leeway = "30s"\nmax_lifetime = "1h"'), extra=store))
    longest = 3600 + 30  # max_lifetime + leeway

    async def assert_kept(body: dict, key: str, earliest: float, latest: float) -> None:
        """Revoke; the key must expire between earliest and latest (plus the call's own duration:
        the store counts the TTL from when the key is written)."""
        called = time.time()
        assert (await revoke(gateway, body))[0] == 200
        low, high = kept_until(redis, key)
        assert earliest <= high and low <= latest + (time.time() - called), (key, low - earliest, high - latest)

    exp = time.time() + 300  # the token is accepted until exp + leeway; the TTL is rounded up to a second
    await assert_kept({"jti": "with-exp", "expires_at": exp}, token_key("with-exp"), exp + 30, exp + 31)
    now = time.time()  # without exp: max_lifetime + leeway from the call
    await assert_kept({"jti": "without-exp"}, token_key("without-exp"), now + longest, now + longest)
    now = time.time()
    await assert_kept({"consumer": "alice"}, consumer_key("alice"), now + longest, now + longest)
    before = time.time() + 600  # tokens issued up to then are revoked: kept until the last one's end
    await assert_kept({"consumer": "bob", "before": before}, consumer_key("bob"), before + longest, before + longest)


@pytest.mark.parametrize("policy, status", [("fail_closed", 503), ("fail_open", 200)])
async def test_an_unreachable_store_follows_the_policy_and_never_answers_500(plugway_gateway, auth_config, key_files,
                                                                             keys, sign, policy, status, rs256_plugin):
    store = f'[store]\nbackend = "redis"\nurl = "redis://127.0.0.1:{free_port()}/0"\ntimeout = "200ms"\n'
    gateway = await plugway_gateway(auth_config(rs256_plugin(f'on_store_error = "{policy}"'), extra=store))
    result = await call(gateway, sign(keys.rsa, "RS256"))
    assert result[0] == status
    if status == 503:
        assert json.loads(result[1])["error"]["code"] == "auth_unavailable" and result[2]["Retry-After"] == "1"
    assert gateway.metric("plugway_auth_store_errors_total", policy=policy) == 1
    assert (await call(gateway, path="/public/x"))[0] == 200  # anonymous needs no store
    async with gateway.client.post(f"{gateway.admin_url}/auth/revocations", json={"jti": "x"}) as response:
        assert response.status == 503


async def test_a_workers_view_of_revocations_is_at_most_max_age_old():
    """The bound behind 'revoked within a second', on the view's own clock: one worker's cached
    answer stands for at most MAX_AGE after another worker revoked the token."""
    from gateway.store import InProcessStore
    from plugway_auth.revocation import MAX_AGE, RevocationView, revoke_token

    store, now = InProcessStore(1000, 1 << 20), [0.0]
    view = RevocationView(store, clock=lambda: now[0])
    assert not await view.revoked("t1", "alice", 100.0)  # looked up and cached
    await revoke_token(store, "t1", 60)  # by another worker
    now[0] = MAX_AGE * 0.9
    assert not await view.revoked("t1", "alice", 100.0)  # the cached answer, still young enough
    now[0] = MAX_AGE * 1.01
    assert await view.revoked("t1", "alice", 100.0)
