"""The shared store: one cache for every worker of a host (the local store process), for every
host (Redis), and a store that fails is a bypass, never a 500."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from gateway.testing import wait_until

FRESH = {"Cache-Control": "max-age=60"}


async def test_the_shared_store_serves_entries_and_variants(cache_gateway, upstream):
    async def greeting(request):
        body = {"en": "hello", "fr": "bonjour"}[request.headers["Accept-Language"]]
        return web.Response(text=body, headers={**FRESH, "Vary": "Accept-Language", "ETag": f'"{body}"'})

    upstream.handler("/greet", greeting)
    cache = await cache_gateway('store = "shared"')
    replies = [await cache.get("/greet", headers={"Accept-Language": language}) for language in ("en", "fr", "en", "fr")]
    assert [(reply.body, reply.cache) for reply in replies] == [
        (b"hello", "MISS"), (b"bonjour", "MISS"), (b"hello", "HIT"), (b"bonjour", "HIT")]
    assert replies[2].headers["ETag"] == '"hello"'
    assert cache.metric("plugway_cache_stored_bytes_total", store="shared") == len(b"hello") + len(b"bonjour")


async def test_every_worker_of_a_host_shares_the_entries(plugway_process, upstream, raw_get, cluster):
    upstream.answer("/a", "shared body", headers=FRESH)
    gateway = plugway_process(cluster(upstream.url, 'store = "shared"'))
    gateway.wait_for_workers(2)
    first = await raw_get(gateway.port, "/a")
    replies = await asyncio.gather(*(raw_get(gateway.port, "/a") for _ in range(40)))
    assert first.cache == "MISS"
    assert {(reply.cache, reply.body) for reply in replies} == {("HIT", b"shared body")}
    assert upstream.hits("/a") == 1
    wait_until(lambda: all(worker["requests"] > 0 for worker in gateway.status()["workers"]), timeout=10)


async def test_hosts_sharing_redis_share_the_entries(plugway_process, redis_server, upstream, raw_get, cluster):
    redis = redis_server()
    store = f'backend = "redis"\nurl = "{redis.url}"\ntimeout = "2s"'
    upstream.answer("/a", "from one host", headers=FRESH)
    hosts = [plugway_process(cluster(upstream.url, 'store = "shared"', workers=1, store=store)) for _ in range(2)]
    site = {"Host": "api.example.com"}  # as a load balancer in front of both hosts would send it
    first = await raw_get(hosts[0].port, "/a", site)
    other = await raw_get(hosts[1].port, "/a", site)
    assert (first.cache, other.cache, other.body) == ("MISS", "HIT", b"from one host")
    assert upstream.hits("/a") == 1
    assert redis.cli("keys", "plugway:cache:*") == "plugway:cache:/a http://api.example.com GET"


async def test_a_failing_store_is_a_bypass_never_an_error(plugway_process, redis_server, upstream, raw_get, cluster,
                                                          scrape):
    redis = redis_server()
    store = f'backend = "redis"\nurl = "{redis.url}"\ntimeout = "100ms"\nretry_interval = "200ms"'
    upstream.answer("/a", "body", headers=FRESH)
    gateway = plugway_process(cluster(upstream.url, 'store = "shared"', workers=1, store=store))
    assert (await raw_get(gateway.port, "/a")).cache == "MISS"
    assert (await raw_get(gateway.port, "/a")).cache == "HIT"
    redis.kill()
    down = [await raw_get(gateway.port, "/a") for _ in range(5)]
    assert {(reply.status, reply.body, reply.cache) for reply in down} == {(200, b"body", "BYPASS")}
    assert await scrape(gateway.admin_port, "plugway_cache_store_errors_total", operation="get") >= 1
    redis.start()  # empty, on the same port
    deadline = time.monotonic() + 10
    while (await raw_get(gateway.port, "/a")).cache != "HIT":
        assert time.monotonic() < deadline, "caching never resumed"
        await asyncio.sleep(0.1)
