"""Requests with credentials, with the real auth plugin (plugway-auth) in front of the cache:
``authorization = "shared"``, and per-consumer entries (``key_extra = ["consumer"]``).

Tokens are real HS256 JWTs, checked by the auth plugin, which sets the consumer (the token's
``sub``) and sends it upstream in ``X-Consumer-ID``.
"""

from __future__ import annotations

import time

import aiohttp
import pytest
from aiohttp import web

jwt = pytest.importorskip("jwt")
pytest.importorskip("plugway_auth")

SECRET_ENV = "PLUGWAY_CACHE_TEST_JWT_SECRET"
SECRET = "a-test-secret-of-more-than-32-bytes-for-hs256"
ISSUER = "https://idp.example.test/"
SITE = {"Host": "api.example.com"}
AUTH = f"""
[[plugins.auth.issuers]]
name = "idp"
issuer = "{ISSUER}"
algorithms = ["HS256"]
hmac_keys = [{{ secret = {{ env = "{SECRET_ENV}" }} }}]
"""


def route(name: str, prefix: str, cache: str) -> str:
    return f'[[routes]]\nname = "{name}"\nprefix = "{prefix}"\nupstream = "app"\n[routes.plugins.cache]\n{cache}\n'


def bearer(sub: str) -> dict[str, str]:
    now = int(time.time())
    token = jwt.encode({"iss": ISSUER, "sub": sub, "iat": now, "exp": now + 300}, SECRET, algorithm="HS256")
    return {**SITE, "Authorization": f"Bearer {token}"}


async def purge_key(cache, key: str) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{cache.running.admin_url}/cache/purge", json={"key": key}) as response:
            assert response.status == 200
            return await response.json()


@pytest.fixture
async def auth_cache(cache_gateway, monkeypatch):
    monkeypatch.setenv(SECRET_ENV, SECRET)

    async def start(routes: str):
        return await cache_gateway(extra=AUTH + routes)

    return start


async def test_authorization_shared_serves_one_entry_to_every_caller(auth_cache, upstream):
    upstream.answer("/shared/list", "the list", headers={"Cache-Control": "max-age=60"})  # not public
    upstream.answer("/rfc/list", "the list", headers={"Cache-Control": "max-age=60"})
    cache = await auth_cache(route("shared", "/shared", 'authorization = "shared"') +
                             route("rfc", "/rfc", 'authorization = "rfc"'))
    alice = await cache.get("/shared/list", bearer("alice"))
    bob = await cache.get("/shared/list", bearer("bob"))
    assert (alice.cache, bob.cache, bob.body) == ("MISS", "HIT", b"the list")
    assert upstream.hits("/shared/list") == 1
    refused = await cache.get("/shared/list", {**SITE, "Authorization": "Bearer not-a-token"})
    assert refused.status == 401 and refused.cache is None  # authentication runs before the cache
    assert [(await cache.get("/rfc/list", bearer(who))).cache for who in ("alice", "bob")] == ["MISS", "MISS"]
    assert upstream.hits("/rfc/list") == 2  # the default (RFC 9111 section 3.5): not stored for them


async def test_consumer_key_part_gives_each_consumer_its_own_entry(auth_cache, upstream):
    async def whoami(request):
        return web.Response(text=request.headers["X-Consumer-ID"], headers={"Cache-Control": "max-age=60"})

    upstream.handler("/mine/me", whoami)
    cache = await auth_cache(route("mine", "/mine", 'key_extra = ["consumer"]'))
    replies = [await cache.get("/mine/me", bearer(who)) for who in ("alice", "bob", "alice", "bob")]
    assert [(reply.body, reply.cache) for reply in replies] == [
        (b"alice", "MISS"), (b"bob", "MISS"), (b"alice", "HIT"), (b"bob", "HIT")]
    assert upstream.hits("/mine/me") == 2
    purged = await purge_key(cache, "/mine/me http://api.example.com GET consumer=alice")  # the key names her
    assert purged["deleted"]["memory"] == 1
    assert (await cache.get("/mine/me", bearer("alice"))).cache == "MISS"
    assert (await cache.get("/mine/me", bearer("bob"))).cache == "HIT"


async def test_a_consumer_key_part_without_a_consumer_keeps_authorization_rules(cache_gateway, upstream):
    """No auth plugin sets a consumer here (the upstream checks Authorization itself): every
    caller would share "consumer=-", so RFC 9111 section 3.5 still applies to them."""

    async def whoami(request):
        return web.Response(text=request.headers["Authorization"], headers={"Cache-Control": "max-age=60"})

    upstream.handler("/me", whoami)
    cache = await cache_gateway(route='[routes.plugins.cache]\nkey_extra = ["consumer"]')
    alice = await cache.get("/me", {"Authorization": "Basic YWxpY2U6cw=="})
    bob = await cache.get("/me", {"Authorization": "Basic Ym9iOnM="})
    assert (bob.body, bob.cache) == (b"Basic Ym9iOnM=", "MISS")
    assert alice.cache == "MISS" and upstream.hits("/me") == 2


async def test_the_anonymous_consumer_keeps_authorization_rules(auth_cache, upstream):
    """The auth plugin lets requests without its credentials in as "anonymous": they all share
    "consumer=anonymous", so an Authorization header meant for the upstream still keeps them apart."""

    async def whoami(request):
        return web.Response(text=request.headers["Authorization"], headers={"Cache-Control": "max-age=60"})

    upstream.handler("/anon/me", whoami)
    anonymous = "[routes.plugins.auth]\nanonymous = true\n"
    cache = await auth_cache(route("anon", "/anon", 'key_extra = ["consumer"]') + anonymous)
    alice = await cache.get("/anon/me", {"Authorization": "Basic YWxpY2U6cw=="})
    bob = await cache.get("/anon/me", {"Authorization": "Basic Ym9iOnM="})
    assert (alice.status, bob.body, bob.cache) == (200, b"Basic Ym9iOnM=", "MISS")
    assert upstream.hits("/anon/me") == 2
