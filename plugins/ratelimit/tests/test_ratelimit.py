"""The rate limiting plugin on a real gateway (in-process store), against a real upstream."""

import hashlib
import secrets
import textwrap
import time

import jwt
import pytest
from aiohttp import web

from gateway.testing import HeaderIdentity, proxy_config, route_table


async def ok(request):
    return web.Response(text="ok")


@pytest.fixture
async def upstream(aiohttp_raw_server):
    server = await aiohttp_raw_server(ok)
    return str(server.make_url("")).rstrip("/")


def config(upstream: str, plugin: str, server: str = "", routes: str = "", identity: str = "[plugins.identity]") -> str:
    plugins = f"{textwrap.dedent(identity)}\n[plugins.ratelimit]\n{textwrap.dedent(plugin)}"
    return proxy_config(upstream, server=server, routes=routes, plugins=plugins)


def per_consumer_and_global(per_consumer: str, everyone: str) -> str:
    """Two limits: "per_consumer" (``per_consumer`` for each consumer) and "global" (``everyone``)."""
    return f"""
        [[plugins.ratelimit.limits]]
        name = "per_consumer"
        key = "consumer"
        rate = "{per_consumer}"
        [[plugins.ratelimit.limits]]
        name = "global"
        key = "global"
        rate = "{everyone}"
    """


async def statuses(gateway, count, path="/api/x", method="GET", headers=None):
    results = []
    for _ in range(count):
        async with gateway.client.request(method, path, headers=headers) as response:
            results.append(response.status)
    return results


async def test_a_limit_answers_429_with_retry_after_and_the_json_error(plugway_gateway, upstream):
    gateway = await plugway_gateway(config(upstream, 'limit = "3/m"'), plugins={"identity": HeaderIdentity()})
    assert await statuses(gateway, 3) == [200, 200, 200]
    async with gateway.client.get("/api/x") as response:
        assert response.status == 429
        body = await response.json()
        assert body["error"]["code"] == "rate_limited"
        assert body["error"]["request_id"] == response.headers["X-Request-ID"]
        assert 1 <= int(response.headers["Retry-After"]) <= 20
        assert response.headers["RateLimit-Policy"] == '"default";q=3;w=60'
        assert response.headers["RateLimit"].startswith('"default";r=0;t=')


async def test_draft_and_legacy_headers_on_every_response(plugway_gateway, upstream):
    gateway = await plugway_gateway(config(upstream, 'limit = "10/m"\nheaders = "both"'),
                                    plugins={"identity": HeaderIdentity()})
    async with gateway.client.get("/api/x") as response:
        assert response.headers["RateLimit-Policy"] == '"default";q=10;w=60'
        assert response.headers["RateLimit"] == '"default";r=9;t=6'
        assert response.headers["X-RateLimit-Limit"] == "10"
        assert response.headers["X-RateLimit-Remaining"] == "9"
        assert response.headers["X-RateLimit-Reset"] == "6"


async def test_sliding_window_never_admits_more_than_the_limit_in_a_window(plugway_gateway, upstream):
    gateway = await plugway_gateway(config(upstream, 'limit = "5/h"\nalgorithm = "sliding_window"'),
                                    plugins={"identity": HeaderIdentity()})
    results = await statuses(gateway, 12)
    assert results == [200] * 5 + [429] * 7


async def test_every_limit_must_pass_and_a_refusal_counts_against_none(plugway_gateway, upstream):
    plugin = per_consumer_and_global("2/h", "5/h")
    gateway = await plugway_gateway(config(upstream, plugin), plugins={"identity": HeaderIdentity()})
    alice, bob, carol = ({"X-Test-User": name} for name in ("alice", "bob", "carol"))
    assert await statuses(gateway, 4, headers=alice) == [200, 200, 429, 429]  # alice's refusals cost global nothing
    assert await statuses(gateway, 2, headers=bob) == [200, 200]
    assert await statuses(gateway, 2, headers=carol) == [200, 429]  # the 5th global token is the last
    async with gateway.client.get("/api/x", headers=carol) as response:
        assert response.status == 429
        assert '"global";q=5;w=3600' in response.headers["RateLimit-Policy"]


async def test_tiers_by_role_and_exempt_roles(plugway_gateway, upstream):
    plugin = """
        [[plugins.ratelimit.limits]]
        key = "consumer"
        rate = "3/h"
        tiers = { anonymous = "1/h", premium = "6/h" }
        exempt = ["admin"]
    """
    gateway = await plugway_gateway(config(upstream, plugin), plugins={"identity": HeaderIdentity()})
    assert await statuses(gateway, 2) == [200, 429]
    assert await statuses(gateway, 4, headers={"X-Test-User": "u"}) == [200, 200, 200, 429]
    assert await statuses(gateway, 7, headers={"X-Test-User": "p", "X-Test-Roles": "premium"}) == [200] * 6 + [429]
    assert await statuses(gateway, 10, headers={"X-Test-User": "root", "X-Test-Roles": "admin"}) == [200] * 10


async def test_anonymous_callers_are_counted_by_address_under_consumer_or_ip(plugway_gateway, upstream):
    plugin = '[[plugins.ratelimit.limits]]\nkey = "consumer_or_ip"\nrate = "1/h"\n'
    server = 'trusted_proxies = ["127.0.0.1/32"]'
    gateway = await plugway_gateway(config(upstream, plugin, server=server), plugins={"identity": HeaderIdentity()})
    first, second = ({"X-Test-Anonymous": "1", "X-Forwarded-For": address} for address in ("10.0.0.1", "10.0.0.2"))
    assert await statuses(gateway, 2, headers=first) == [200, 429]
    assert await statuses(gateway, 1, headers=second) == [200]  # not one bucket for every anonymous caller
    assert await statuses(gateway, 2, headers={"X-Test-User": "anonymous-looking"}) == [200, 429]


async def test_a_spoofed_x_forwarded_for_cannot_rotate_the_key(plugway_gateway, upstream):
    plugin = '[[plugins.ratelimit.limits]]\nkey = "ip"\nrate = "3/h"\n'
    gateway = await plugway_gateway(config(upstream, plugin), plugins={"identity": HeaderIdentity()})
    results = []
    for i in range(5):
        results += await statuses(gateway, 1, headers={"X-Forwarded-For": f"10.0.0.{i}", "X-Real-IP": f"10.1.0.{i}"})
    assert results == [200, 200, 200, 429, 429]


async def test_path_variants_and_head_share_the_routes_limit(plugway_gateway, upstream):
    gateway = await plugway_gateway(config(upstream, 'limit = "4/h"'), plugins={"identity": HeaderIdentity()})
    results = []
    for path, method in (("/api/x", "GET"), ("/api//x", "GET"), ("/api/%78", "HEAD"), ("/api/./y/../x", "GET"),
                         ("/api/x?cache-buster=1", "GET")):
        results += await statuses(gateway, 1, path=path, method=method)
    assert results == [200, 200, 200, 200, 429]
    assert (await statuses(gateway, 1, path="/API/x"))[0] == 404  # another path entirely, no route


async def test_a_route_can_turn_the_limit_off_or_set_its_own(plugway_gateway, upstream):
    routes = route_table("open", ratelimit="enabled = false") + route_table("strict", ratelimit='limit = "1/h"')
    gateway = await plugway_gateway(config(upstream, 'limit = "3/h"', routes=routes),
                                    plugins={"identity": HeaderIdentity()})
    assert await statuses(gateway, 5, path="/open/x") == [200] * 5
    assert await statuses(gateway, 2, path="/strict/x") == [200, 429]
    assert await statuses(gateway, 4, path="/api/x") == [200, 200, 200, 429]


def rate_header_names(response) -> set[str]:
    return {name.lower() for name in response.headers if name.lower().startswith(("ratelimit", "x-ratelimit"))}


async def test_legacy_headers_alone_show_the_tightest_limit(plugway_gateway, upstream):
    plugin = 'headers = "legacy"\n' + per_consumer_and_global("2/h", "10/m")
    gateway = await plugway_gateway(config(upstream, plugin), plugins={"identity": HeaderIdentity()})
    legacy = {"x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"}
    async with gateway.client.get("/api/x") as response:
        assert rate_header_names(response) == legacy
        assert response.headers["X-RateLimit-Limit"] == "2"  # per_consumer has 1 left, global 9
        assert response.headers["X-RateLimit-Remaining"] == "1"
        assert response.headers["X-RateLimit-Reset"] == "1800"
    await statuses(gateway, 1)
    async with gateway.client.get("/api/x") as response:
        assert response.status == 429
        assert rate_header_names(response) == legacy
        assert response.headers["X-RateLimit-Remaining"] == "0"


async def test_no_rate_headers_with_headers_none_but_retry_after_on_429(plugway_gateway, upstream):
    gateway = await plugway_gateway(config(upstream, 'limit = "1/h"\nheaders = "none"'),
                                    plugins={"identity": HeaderIdentity()})
    async with gateway.client.get("/api/x") as response:
        assert response.status == 200 and rate_header_names(response) == set()
    async with gateway.client.get("/api/x") as response:
        assert response.status == 429 and rate_header_names(response) == set()
        assert int(response.headers["Retry-After"]) >= 1
        assert (await response.json())["error"]["code"] == "rate_limited"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def test_api_keys_are_counted_apart_and_only_their_hash_reaches_the_store(plugway_gateway, redis_server,
                                                                               upstream):
    """With the real auth plugin's API keys, hidden from the upstream (after the limit has read them)."""
    redis = redis_server()
    first, second = ("pwk_" + secrets.token_urlsafe(32) for _ in range(2))
    auth = "[plugins.auth]\nhide_credentials = true\n" + "".join(
        f'[[plugins.auth.api_keys]]\nhash = "sha256:{sha256(key)}"\nconsumer = "c{i}"\n'
        for i, key in enumerate((first, second)))
    plugin = '[[plugins.ratelimit.limits]]\nkey = "api_key"\nrate = "2/h"\n'
    store = f'\n[store]\nbackend = "redis"\nurl = "{redis.url}"\ntimeout = "2s"\n'
    gateway = await plugway_gateway(config(upstream, plugin, identity=auth) + store)
    assert await statuses(gateway, 3, headers={"X-API-Key": first}) == [200, 200, 429]
    assert await statuses(gateway, 2, headers={"X-API-Key": second}) == [200, 200]
    expected = sorted(f"plugway:rl:{{api:default:{sha256(key)[:32]}}}" for key in (first, second))
    assert sorted(redis.cli("keys", "*").split()) == expected


async def test_a_header_key_counts_each_value_apart(plugway_gateway, upstream):
    plugin = '[[plugins.ratelimit.limits]]\nkey = "header:X-Tenant"\nrate = "2/h"\n'
    gateway = await plugway_gateway(config(upstream, plugin), plugins={"identity": HeaderIdentity()})
    acme = await statuses(gateway, 2, headers={"X-Tenant": "acme", "X-Test-User": "alice"})
    assert acme + await statuses(gateway, 1, headers={"X-Tenant": "acme", "X-Test-User": "bob"}) == [200, 200, 429]
    assert await statuses(gateway, 2, headers={"x-tenant": "globex", "X-Test-User": "alice"}) == [200, 200]
    assert await statuses(gateway, 3) == [200, 200, 429]  # no header: one bucket of its own
    long = "t" * 80  # long values are hashed whole, never cut to a shared prefix
    assert await statuses(gateway, 3, headers={"X-Tenant": long + "1"}) == [200, 200, 429]
    assert await statuses(gateway, 2, headers={"X-Tenant": long + "2"}) == [200, 200]


OTHER_ROUTE = route_table("other")


async def test_a_route_key_counts_every_caller_of_a_route_together_and_each_route_apart(plugway_gateway, upstream):
    plugin = '[[plugins.ratelimit.limits]]\nkey = "route"\nrate = "2/h"\n'
    gateway = await plugway_gateway(config(upstream, plugin, routes=OTHER_ROUTE),
                                    plugins={"identity": HeaderIdentity()})
    alice, bob = {"X-Test-User": "alice"}, {"X-Test-User": "bob"}
    assert await statuses(gateway, 1, headers=alice) + await statuses(gateway, 2, headers=bob) == [200, 200, 429]
    assert await statuses(gateway, 3, path="/other/x", headers=alice) == [200, 200, 429]


@pytest.mark.parametrize("shared", [False, True])
async def test_shared_by_routes_counts_the_routes_together(plugway_gateway, upstream, shared):
    plugin = f'[[plugins.ratelimit.limits]]\nkey = "consumer"\nrate = "3/h"\nshared_by_routes = {str(shared).lower()}\n'
    gateway = await plugway_gateway(config(upstream, plugin, routes=OTHER_ROUTE),
                                    plugins={"identity": HeaderIdentity()})
    alice = {"X-Test-User": "alice"}
    assert await statuses(gateway, 2, headers=alice) == [200, 200]
    other = await statuses(gateway, 3, path="/other/x", headers=alice)
    assert other == ([200, 429, 429] if shared else [200, 200, 200])
    assert await statuses(gateway, 1, path="/other/x", headers={"X-Test-User": "bob"}) == [200]


HMAC_ENV = "PLUGWAY_RATELIMIT_TEST_HMAC"
AUTH = f"""
    [plugins.auth]
    [[plugins.auth.issuers]]
    name = "idp"
    issuer = "https://idp.test/"
    audience = ["api"]
    algorithms = ["HS256"]
    hmac_keys = [{{ secret = {{ env = "{HMAC_ENV}" }} }}]
"""
PUBLIC_ROUTE = route_table("public", auth="anonymous = true")


@pytest.fixture
def bearer(monkeypatch):
    """``bearer(sub, roles)``: headers with a real HS256 token, signed with a secret made for this test."""
    secret = secrets.token_urlsafe(48)
    monkeypatch.setenv(HMAC_ENV, secret)

    def headers(sub: str, roles: tuple[str, ...] = (), **more: str) -> dict[str, str]:
        now = int(time.time())
        claims = {"iss": "https://idp.test/", "aud": "api", "sub": sub, "iat": now, "exp": now + 600, "roles": roles}
        return {"Authorization": "Bearer " + jwt.encode(claims, secret, algorithm="HS256"), **more}

    return headers


async def test_real_jwt_consumers_get_their_own_buckets_and_anonymous_callers_their_address(
        plugway_gateway, upstream, bearer):
    plugin = '[[plugins.ratelimit.limits]]\nkey = "consumer_or_ip"\nrate = "2/h"\n'
    server = 'trusted_proxies = ["127.0.0.1/32"]'
    gateway = await plugway_gateway(config(upstream, plugin, server=server, routes=PUBLIC_ROUTE, identity=AUTH))
    one, two = {"X-Forwarded-For": "10.0.0.1"}, {"X-Forwarded-For": "10.0.0.2"}
    assert await statuses(gateway, 3, path="/public/x", headers=bearer("alice", **one)) == [200, 200, 429]
    assert await statuses(gateway, 3, path="/public/x", headers=bearer("bob", **one)) == [200, 200, 429]
    assert await statuses(gateway, 1, path="/public/x", headers=bearer("alice", **two)) == [429]  # not by address
    assert await statuses(gateway, 3, path="/public/x", headers=one) == [200, 200, 429]  # anonymous: by address
    assert await statuses(gateway, 3, path="/public/x", headers=two) == [200, 200, 429]
    assert await statuses(gateway, 1, path="/public/x", headers={"Authorization": "Bearer x.y.z"}) == [401]


async def test_tiers_follow_the_roles_of_a_real_jwt_and_anonymous_callers_share_one_consumer_bucket(
        plugway_gateway, upstream, bearer):
    plugin = """
        [[plugins.ratelimit.limits]]
        key = "consumer"
        rate = "2/h"
        tiers = { anonymous = "1/h", premium = "3/h" }
    """
    server = 'trusted_proxies = ["127.0.0.1/32"]'
    gateway = await plugway_gateway(config(upstream, plugin, server=server, routes=PUBLIC_ROUTE, identity=AUTH))
    assert await statuses(gateway, 4, path="/public/x", headers=bearer("p", ("premium",))) == [200] * 3 + [429]
    assert await statuses(gateway, 3, path="/public/x", headers=bearer("u", ("reader",))) == [200, 200, 429]
    anonymous = [await statuses(gateway, 1, path="/public/x", headers={"X-Forwarded-For": f"10.0.0.{i}"})
                 for i in range(3)]
    assert anonymous == [[200], [429], [429]]


async def test_metrics_count_allowed_and_limited(plugway_gateway, upstream):
    gateway = await plugway_gateway(config(upstream, 'limit = "1/h"'), plugins={"identity": HeaderIdentity()})
    await statuses(gateway, 3)
    text = gateway.gateway.metrics.exposition().decode()
    assert 'plugway_ratelimit_requests_total{limit="default",result="allowed",route="api"} 1.0' in text
    assert 'plugway_ratelimit_requests_total{limit="default",result="limited",route="api"} 2.0' in text
    assert 'plugway_ratelimit_store_seconds_count{backend="local"} 3.0' in text


@pytest.mark.parametrize("policy, status", [("fail_open", 200), ("fail_closed", 503), ("local", 200)])
async def test_store_failure_follows_the_policy(plugway_gateway, upstream, policy, status):
    """An unreachable Redis (a port nobody listens on) with each policy."""
    from gateway.testing import free_port

    plugin = f'limit = "1/h"\non_store_error = "{policy}"'
    store = f'\n[store]\nbackend = "redis"\nurl = "redis://127.0.0.1:{free_port()}/0"\ntimeout = "200ms"\n'
    gateway = await plugway_gateway(config(upstream, plugin) + store, plugins={"identity": HeaderIdentity()})
    results = await statuses(gateway, 3)
    expected = {"fail_open": [200, 200, 200], "fail_closed": [503, 503, 503], "local": [200, 429, 429]}[policy]
    assert results == expected
    assert results[0] == status
    text = gateway.gateway.metrics.exposition().decode()
    assert f'plugway_ratelimit_store_errors_total{{policy="{policy}"}} 3.0' in text


def test_settings_are_checked():
    from gateway import config as gateway_config
    from gateway.config.schema import ConfigErrors
    from gateway.plugins import load_plugins

    text = config("http://127.0.0.1:9", 'limit = "lots"\nalgorithm = "leaky"\n', identity="")
    with pytest.raises(ConfigErrors) as caught:
        load_plugins(gateway_config.loads(text))
    messages = [str(e) for e in caught.value.errors]
    assert any(m.startswith("plugins.ratelimit.limit: 'lots' is not a rate") for m in messages)
    assert any(m.startswith("plugins.ratelimit.algorithm: must be one of") for m in messages)
