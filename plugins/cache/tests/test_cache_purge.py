"""Purges through the admin API and `plugway cache purge`: by exact key, by path prefix and by
tag, in the shared store and in every worker's memory store."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from aiohttp import web

from gateway.testing import wait_until

SITE = {"Host": "api.example.com"}
TOKEN = "a-long-enough-admin-token"


def tagged(tags: str):
    async def answer(request):
        return web.Response(text=request.path, headers={"Cache-Control": "max-age=60", "Surrogate-Key": tags})
    return answer


async def purge(admin_url: str, rule: dict, token: str | None = None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{admin_url}/cache/purge", json=rule, headers=headers) as response:
            return response.status, await response.json(content_type=None)


@pytest.mark.parametrize("store", ["memory", "shared"])
async def test_purge_by_key_prefix_and_tag(cache_gateway, upstream, store):
    for path, tags in (("/api/items/1", "item-1 items"), ("/api/items/2", "item-2 items"),
                       ("/api/items/10", "item-10"), ("/api/other", "other")):
        upstream.handler(path, tagged(tags))
    cache = await cache_gateway(f'store = "{store}"\ntag_header = "Surrogate-Key"')
    paths = ("/api/items/1", "/api/items/2", "/api/items/10", "/api/other")

    async def cached() -> dict[str, bool]:
        return {path: (await cache.get(path, SITE)).cache == "HIT" for path in paths}

    for path in paths:
        first = await cache.get(path, SITE)
        assert first.cache == "MISS" and "Surrogate-Key" not in first.headers
    assert all((await cached()).values())

    status, result = await purge(cache.running.admin_url, {"key": "/api/items/1 http://api.example.com GET"})
    assert status == 200 and result["deleted"][store] == 1
    assert await cached() == {"/api/items/1": False, "/api/items/2": True, "/api/items/10": True, "/api/other": True}

    status, result = await purge(cache.running.admin_url, {"tag": "items"})
    assert (status, result["deleted"][store]) == (200, 2)  # items/1 (cached again above) and items/2
    assert await cached() == {"/api/items/1": False, "/api/items/2": False, "/api/items/10": True, "/api/other": True}

    status, result = await purge(cache.running.admin_url, {"prefix": "/api/items"})
    assert status == 200 and result["deleted"][store] == 3
    assert await cached() == {"/api/items/1": False, "/api/items/2": False, "/api/items/10": False,
                              "/api/other": True}
    assert cache.metric("plugway_cache_purges_total", kind="prefix") == 1


async def test_purging_a_key_purges_its_variants(cache_gateway, upstream):
    async def greeting(request):
        return web.Response(text=request.headers["Accept-Language"], headers={"Cache-Control": "max-age=60",
                                                                             "Vary": "Accept-Language"})

    upstream.handler("/greet", greeting)
    cache = await cache_gateway()
    for language in ("en", "fr"):
        await cache.get("/greet", {**SITE, "Accept-Language": language})
    status, result = await purge(cache.running.admin_url, {"key": "/greet http://api.example.com GET"})
    assert (status, result["deleted"]["memory"]) == (200, 3)  # the Vary record and both variants
    assert (await cache.get("/greet", {**SITE, "Accept-Language": "fr"})).cache == "MISS"


async def test_bad_purges_are_refused(cache_gateway, upstream):
    cache = await cache_gateway()
    for rule in ({}, {"key": ""}, {"prefix": "no-slash"}, {"tag": 5}, {"key": "a", "tag": "b"}, [1]):
        status, result = await purge(cache.running.admin_url, rule)
        assert (status, result["error"]["code"]) == (400, "bad_purge"), rule


async def test_purge_needs_the_admin_token_when_one_is_set(cache_gateway, upstream, monkeypatch):
    monkeypatch.setenv("CACHE_TEST_ADMIN_TOKEN", TOKEN)
    cache = await cache_gateway(extra='[admin]\ntoken_env = "CACHE_TEST_ADMIN_TOKEN"')
    assert (await purge(cache.running.admin_url, {"prefix": "/"}))[0] == 401
    assert (await purge(cache.running.admin_url, {"prefix": "/"}, TOKEN))[0] == 200


async def test_the_purge_command_purges_every_workers_memory(plugway_process, upstream, raw_get, cluster):
    version = {"body": "v1"}

    async def current(request):
        return web.Response(text=version["body"], headers={"Cache-Control": "max-age=600"})

    upstream.handler("/a", current)
    gateway = plugway_process(cluster(upstream.url, 'store = "memory"') + '[admin]\ntoken_env = "PLUGWAY_TEST_TOKEN"\n',
                              env={"PLUGWAY_TEST_TOKEN": TOKEN})
    gateway.wait_for_workers(2)
    deadline = time.monotonic() + 20
    while upstream.hits("/a") < 2:  # each worker has its own memory store: both fetch once
        assert time.monotonic() < deadline, "the requests never reached both workers"
        await raw_get(gateway.port, "/a")
    assert {(await raw_get(gateway.port, "/a")).body for _ in range(10)} == {b"v1"}
    version["body"] = "v2"

    done = await asyncio.to_thread(gateway.cli, "cache", "purge", "--prefix", "/a")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["purged"] == {"prefix": "/a"}

    deadline = time.monotonic() + 20
    while upstream.hits("/a") < 4:  # within the purge log's poll interval, both workers fetch again
        assert time.monotonic() < deadline, "a worker kept its purged entry"
        await raw_get(gateway.port, "/a")
    assert {(await raw_get(gateway.port, "/a")).body for _ in range(20)} == {b"v2"}
    wait_until(lambda: all(worker["requests"] > 0 for worker in gateway.status()["workers"]), timeout=10)


async def test_the_purge_command_reports_failures(plugway_process, upstream, cluster):
    gateway = plugway_process(cluster(upstream.url, "") + '[admin]\ntoken_env = "PLUGWAY_TEST_TOKEN"\n',
                              env={"PLUGWAY_TEST_TOKEN": TOKEN})
    gateway.env = {**gateway.env, "PLUGWAY_TEST_TOKEN": "not-the-token-at-all"}
    refused = await asyncio.to_thread(gateway.cli, "cache", "purge", "--tag", "x")
    assert refused.returncode == 1 and "401" in refused.stderr
    missing = await asyncio.to_thread(gateway.cli, "cache", "purge")
    assert missing.returncode == 2 and "one of the arguments" in missing.stderr
