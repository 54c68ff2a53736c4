"""Cache poisoning and deception attempts (research/reliability.md section 3.6): an attacker's
request must never change what other clients get from the cache."""

from __future__ import annotations

from aiohttp import web

FRESH = {"Cache-Control": "max-age=60"}


async def reflect(request: web.BaseRequest) -> web.Response:
    """An upstream that builds absolute links from the forwarded host, as many frameworks do,
    and honours X-Original-URL / X-HTTP-Method-Override, as some do."""
    path = request.headers.get("X-Original-URL", request.path)
    method = request.headers.get("X-HTTP-Method-Override", request.method)
    body = f"{method} {path} at {request.headers.get('X-Forwarded-Host')} " \
           f"via {request.headers.get('X-Forwarded-Scheme', 'http')}"
    return web.Response(text=body, headers=FRESH)


async def test_an_unkeyed_x_forwarded_host_cannot_change_the_cached_body(cache_gateway, upstream):
    upstream.handler("/home", reflect)
    cache = await cache_gateway()
    attack = await cache.get("/home", headers={"X-Forwarded-Host": "evil.example"})
    victim = await cache.get("/home")
    assert b"evil" not in attack.body  # the core replaced the client's value with its Host
    assert victim.cache == "HIT" and b"evil" not in victim.body


async def test_headers_that_rewrite_the_request_upstream_bypass_the_cache(cache_gateway, upstream):
    upstream.handler("/home", reflect)
    cache = await cache_gateway()
    for name, value in (("X-Original-URL", "/admin"), ("X-Rewrite-URL", "/admin"),
                        ("X-HTTP-Method-Override", "DELETE"), ("X-Forwarded-Scheme", "nothttps")):
        attack = await cache.get("/home", headers={name: value})
        assert attack.cache == "BYPASS"
    first = await cache.get("/home")
    attack = await cache.get("/home", headers={"X-Original-URL": "/admin"})
    victim = await cache.get("/home")
    assert attack.body.startswith(b"GET /admin") and attack.cache == "BYPASS"
    assert (first.cache, victim.cache) == ("MISS", "HIT")
    assert victim.body.startswith(b"GET /home") and victim.body == first.body


async def test_a_port_in_host_is_part_of_the_key(cache_gateway, upstream):
    upstream.handler("/home", reflect)
    cache = await cache_gateway()
    attack = await cache.get("/home", headers={"Host": "127.0.0.1:1337"})
    victim = await cache.get("/home")
    assert b"127.0.0.1:1337" in attack.body
    assert victim.cache == "MISS" and b"1337" not in victim.body


async def test_a_static_looking_path_is_not_cached_unless_the_upstream_says_so(cache_gateway, upstream):
    async def account(request):
        return web.Response(text="alice's account page", headers=dict(request.query))

    upstream.handler("/account/profile.css", account)
    cache = await cache_gateway()
    await cache.get("/account/profile.css")
    victim = await cache.get("/account/profile.css")
    assert victim.cache == "MISS" and upstream.hits() == 2


async def test_private_pages_stay_private_even_with_a_default_ttl(cache_gateway, upstream):
    upstream.answer("/account/profile.css", "alice's page", headers={"Cache-Control": "private"})
    upstream.answer("/static/site.css", "body{}", headers={"Cache-Control": "public, max-age=60"})
    cache = await cache_gateway('default_ttl = "60s"')
    for _ in range(2):
        assert (await cache.get("/account/profile.css")).cache == "MISS"
    await cache.get("/static/site.css")
    assert (await cache.get("/static/site.css")).cache == "HIT"  # the upstream said so


async def test_ambiguous_paths_are_refused_before_the_cache(cache_gateway, upstream):
    upstream.answer("/account", "alice's page", headers=FRESH)
    cache = await cache_gateway()
    for path in ("/account;x.css", "/account%2fx.css", "/account%2Fx.css", "/account/..%2fx.css"):
        reply = await cache.get(path)
        assert reply.status == 400, path
    assert upstream.hits() == 0


async def test_path_spellings_share_one_entry(cache_gateway, upstream):
    upstream.answer("/a/b", "b", headers=FRESH)
    cache = await cache_gateway()
    replies = [await cache.get(path) for path in ("/a/b", "/a/%62", "/a/./b", "/a//b", "/a/c/../b")]
    assert [reply.body for reply in replies] == [b"b"] * 5
    assert [reply.cache for reply in replies] == ["MISS"] + ["HIT"] * 4
    assert upstream.hits() == 1


async def test_query_order_is_part_of_the_key_unless_sorted(cache_gateway, upstream):
    upstream.answer("/q", "q", headers=FRESH)
    cache = await cache_gateway(route='[routes.plugins.cache]\nsort_query = true',
                                extra='[[routes]]\nname = "raw"\nprefix = "/raw"\nupstream = "app"\n'
                                      'strip_prefix = true')
    assert [(await cache.get(path)).cache for path in ("/q?a=1&b=2", "/q?b=2&a=1")] == ["MISS", "HIT"]
    assert [(await cache.get(path)).cache for path in ("/raw/q?a=1&b=2", "/raw/q?b=2&a=1")] == ["MISS", "MISS"]


async def test_an_error_provoked_by_a_malformed_request_is_not_stored(cache_gateway, upstream):
    async def strict(request):
        if "X-Oversized" in request.headers:
            return web.Response(status=400, text="bad request", headers=FRESH)  # marked cacheable by mistake
        return web.Response(text="fine", headers=FRESH)

    upstream.handler("/page", strict)
    cache = await cache_gateway()
    attack = await cache.get("/page", headers={"X-Oversized": "x" * 4000})
    victim = await cache.get("/page")
    assert attack.status == 400
    assert (victim.status, victim.body) == (200, b"fine")


async def test_http_and_https_do_not_share_entries(cache_gateway, upstream):
    async def redirect_to_https(request):
        if request.headers.get("X-Forwarded-Proto") == "http":
            return web.Response(status=301, headers={"Location": "https://site/", **FRESH})
        return web.Response(text="secure content", headers=FRESH)

    upstream.handler("/", redirect_to_https)
    cache = await cache_gateway(server='trusted_proxies = ["127.0.0.1/32"]')
    plain = await cache.get("/", headers={"X-Forwarded-Proto": "http"})
    secure = await cache.get("/", headers={"X-Forwarded-Proto": "https"})
    assert plain.status == 301 and (secure.status, secure.body) == (200, b"secure content")
    assert (await cache.get("/", headers={"X-Forwarded-Proto": "https"})).cache == "HIT"
