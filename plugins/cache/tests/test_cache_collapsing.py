"""Request collapsing: concurrent misses for one key send one request upstream, per worker with
the memory store (in-process) and per host with the shared store (the real cluster).

The upstream holds every request at a gate until the test has seen the other 99 requests
waiting (the plugway_cache_waiting gauge), then answers: no timing assumption."""

from __future__ import annotations

import asyncio
import time

from gateway.testing import wait_until

FRESH = {"Cache-Control": "max-age=60"}


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.01)


async def test_100_concurrent_misses_send_one_request_upstream(cache_gateway, upstream):
    upstream.answer("/cold", "the body", headers=FRESH)
    upstream.gate = asyncio.Event()
    cache = await cache_gateway()
    requests = [asyncio.create_task(cache.get("/cold")) for _ in range(100)]
    await cache.wait_for_metric("plugway_cache_waiting", 99)
    await asyncio.wait_for(_until(lambda: upstream.hits("/cold") >= 1), 10)  # the leader's request arrives
    upstream.gate.set()
    replies = await asyncio.gather(*requests)
    assert {(reply.status, reply.body) for reply in replies} == {(200, b"the body")}
    assert sorted(reply.cache for reply in replies) == ["HIT"] * 99 + ["MISS"]
    assert upstream.hits("/cold") == 1
    assert cache.metric("plugway_cache_collapsed_total") == 99
    assert cache.metric("plugway_cache_waiting") == 0


async def test_followers_of_an_unstorable_answer_go_upstream_at_once(cache_gateway, upstream):
    upstream.answer("/private", "mine", headers={"Cache-Control": "private"})
    upstream.gate = asyncio.Event()
    cache = await cache_gateway('collapse_timeout = "30s"')
    requests = [asyncio.create_task(cache.get("/private")) for _ in range(20)]
    await cache.wait_for_metric("plugway_cache_waiting", 19)
    upstream.gate.set()
    replies = await asyncio.wait_for(asyncio.gather(*requests), 10)  # far less than the 30 s timeout
    assert {reply.status for reply in replies} == {200}
    assert upstream.hits("/private") == 20
    # the key is now known to be unstorable: the next concurrent requests do not wait at all
    upstream.gate = asyncio.Event()
    more = [asyncio.create_task(cache.get("/private")) for _ in range(5)]
    await asyncio.wait_for(_until(lambda: upstream.hits("/private") == 25), 10)
    upstream.gate.set()
    await asyncio.gather(*more)


async def test_followers_go_upstream_themselves_after_the_collapse_timeout(cache_gateway, upstream):
    upstream.answer("/slow", "late", headers=FRESH)
    upstream.gate = asyncio.Event()
    cache = await cache_gateway('collapse_timeout = "200ms"')
    requests = [asyncio.create_task(cache.get("/slow")) for _ in range(5)]
    await asyncio.wait_for(_until(lambda: upstream.hits("/slow") == 5), 10)
    upstream.gate.set()
    replies = await asyncio.gather(*requests)
    assert {(reply.status, reply.body) for reply in replies} == {(200, b"late")}


async def test_a_leader_whose_client_leaves_lets_its_followers_go(cache_gateway, upstream):
    upstream.answer("/a", "x", headers=FRESH)
    upstream.gate = asyncio.Event()
    cache = await cache_gateway('collapse_timeout = "30s"')
    leader = asyncio.create_task(cache.get("/a"))
    await asyncio.wait_for(_until(lambda: upstream.hits("/a") == 1), 10)
    followers = [asyncio.create_task(cache.get("/a")) for _ in range(3)]
    await cache.wait_for_metric("plugway_cache_waiting", 3)
    leader.cancel()  # the leading client goes away: its followers must not wait 30 s
    await asyncio.wait_for(_until(lambda: upstream.hits("/a") == 2), 10)  # one of them leads now
    upstream.gate.set()
    replies = await asyncio.wait_for(asyncio.gather(*followers), 10)
    assert {reply.status for reply in replies} == {200}
    assert upstream.hits("/a") == 2


async def test_100_concurrent_misses_across_two_workers_send_one_request_upstream(plugway_process, upstream, raw_get,
                                                                                     cluster, scrape):
    upstream.answer("/cold", "the body", headers=FRESH)
    upstream.gate = asyncio.Event()
    gateway = plugway_process(cluster(upstream.url, 'store = "shared"\ncollapse_timeout = "30s"'))
    gateway.wait_for_workers(2)
    requests = [asyncio.create_task(raw_get(gateway.port, "/cold")) for _ in range(100)]
    deadline = time.monotonic() + 30
    while await scrape(gateway.admin_port, "plugway_cache_waiting") < 99:
        assert time.monotonic() < deadline, "the requests never all waited"
        await asyncio.sleep(0.02)
    await asyncio.wait_for(_until(lambda: upstream.hits("/cold") >= 1), 10)
    upstream.gate.set()
    replies = await asyncio.gather(*requests)
    assert {(reply.status, reply.body) for reply in replies} == {(200, b"the body")}
    assert upstream.hits("/cold") == 1
    # both workers took part (the kernel spreads new connections over their sockets)
    wait_until(lambda: all(worker["requests"] > 0 for worker in gateway.status()["workers"]), timeout=10)
