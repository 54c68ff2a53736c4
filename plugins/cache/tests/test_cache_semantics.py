"""RFC 9111 through the real gateway: each directive, Vary, conditional requests, revalidation,
stale-while-revalidate and stale-if-error, Set-Cookie and Authorization, HEAD and sizes.

Tests of expiry use lifetimes of one second and wait just past them: time is what they test.
"""

from __future__ import annotations

import asyncio
import math
import time

import pytest
from aiohttp import web

from plugway_cache.directives import format_http_date

FRESH = {"Cache-Control": "max-age=60"}


def assert_age(reply, since: float, upstream_age: int = 0) -> None:
    """``Age`` is whole seconds: at least the upstream's, at most that plus the time since
    ``since`` (``time.monotonic()`` before the miss), plus 1 as ``Date`` has whole seconds."""
    age = int(reply.headers["Age"])
    elapsed = time.monotonic() - since
    assert upstream_age <= age <= upstream_age + elapsed + 1, (age, upstream_age, elapsed)


async def test_max_age_is_served_from_the_cache_with_age(cache_gateway, upstream):
    upstream.answer("/a", "first", headers=FRESH)
    cache = await cache_gateway()
    started = time.monotonic()
    miss = await cache.get("/a")
    upstream.answer("/a", "second", headers=FRESH)
    hit = await cache.get("/a")
    assert (miss.cache, miss.body) == ("MISS", b"first")
    assert (hit.status, hit.cache, hit.body) == (200, "HIT", b"first")
    assert_age(hit, started)
    assert upstream.hits("/a") == 1
    await cache.wait_for_metric("plugway_cache_requests_total", 1, route="all", result="hit")
    assert cache.metric("plugway_cache_requests_total", route="all", result="miss") == 1
    assert cache.metric("plugway_cache_memory_entries") == 1


async def test_age_counts_the_upstreams_age_and_the_time_stored(cache_gateway, upstream):
    upstream.answer("/a", "x", headers={"Cache-Control": "max-age=600", "Age": "100"})
    cache = await cache_gateway()
    started = time.monotonic()
    await cache.get("/a")
    assert_age(await cache.get("/a"), started, upstream_age=100)


async def test_s_maxage_wins_over_max_age_for_a_shared_cache(cache_gateway, upstream):
    upstream.answer("/shared", "s", headers={"Cache-Control": "max-age=0, s-maxage=60"})
    upstream.answer("/private-lifetime", "p", headers={"Cache-Control": "max-age=60, s-maxage=0"})
    cache = await cache_gateway()
    for path in ("/shared", "/private-lifetime"):
        await cache.get(path)
        await cache.get(path)
    assert upstream.hits("/shared") == 1
    assert upstream.hits("/private-lifetime") == 2


async def test_no_store_and_private_are_never_stored(cache_gateway, upstream):
    upstream.answer("/no-store", "n", headers={"Cache-Control": "no-store, max-age=60"})
    upstream.answer("/private", "p", headers={"Cache-Control": "private, max-age=60"})
    cache = await cache_gateway('default_ttl = "60s"')
    for path in ("/no-store", "/private"):
        replies = [await cache.get(path) for _ in range(3)]
        assert [reply.cache for reply in replies] == ["MISS"] * 3
        assert upstream.hits(path) == 3


async def test_private_fields_are_not_stored(cache_gateway, upstream):
    upstream.answer("/a", "x", headers={"Cache-Control": 'max-age=60, private="X-User"', "X-User": "alice",
                                        "X-Other": "kept"})
    cache = await cache_gateway()
    first = await cache.get("/a")
    second = await cache.get("/a")
    assert first.headers["X-User"] == "alice"
    assert second.cache == "HIT" and "X-User" not in second.headers and second.headers["X-Other"] == "kept"


async def test_no_cache_is_stored_but_revalidated_every_time(cache_gateway, upstream):
    calls = []

    async def etagged(request):
        calls.append(request.headers.get("If-None-Match"))
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers={"ETag": '"v1"', "Cache-Control": "no-cache"})
        return web.Response(text="body", headers={"ETag": '"v1"', "Cache-Control": "no-cache"})

    upstream.handler("/a", etagged)
    cache = await cache_gateway()
    first, second, third = [await cache.get("/a") for _ in range(3)]
    assert calls == [None, '"v1"', '"v1"']
    assert (first.cache, second.cache, third.cache) == ("MISS", "EXPIRED", "EXPIRED")
    assert second.body == third.body == b"body" and second.status == 200


async def test_no_cache_without_a_validator_is_not_stored(cache_gateway, upstream):
    upstream.answer("/a", "x", headers={"Cache-Control": "no-cache, max-age=60"})
    cache = await cache_gateway()
    await cache.get("/a")
    assert (await cache.get("/a")).cache == "MISS"
    assert upstream.hits("/a") == 2


async def test_expires_is_a_lifetime_and_an_invalid_one_is_expired(cache_gateway, upstream):
    now = time.time()
    upstream.answer("/later", "l", headers={"Date": format_http_date(now), "Expires": format_http_date(now + 60)})
    upstream.answer("/past", "p", headers={"Date": format_http_date(now), "Expires": format_http_date(now - 60)})
    upstream.answer("/zero", "z", headers={"Expires": "0"})
    cache = await cache_gateway()
    for path in ("/later", "/past", "/zero"):
        await cache.get(path)
        await cache.get(path)
    assert (upstream.hits("/later"), upstream.hits("/past"), upstream.hits("/zero")) == (1, 2, 2)


async def test_max_age_wins_over_expires(cache_gateway, upstream):
    upstream.answer("/a", "x", headers={"Cache-Control": "max-age=60", "Expires": "Thu, 01 Jan 1970 00:00:00 GMT"})
    cache = await cache_gateway()
    await cache.get("/a")
    assert (await cache.get("/a")).cache == "HIT"


async def test_an_entry_expires_after_its_lifetime(cache_gateway, upstream):
    upstream.answer("/a", "old", headers={"Cache-Control": "max-age=1"})
    cache = await cache_gateway()
    await cache.get("/a")
    upstream.answer("/a", "new", headers={"Cache-Control": "max-age=1"})
    await asyncio.sleep(1.1)
    after = await cache.get("/a")
    assert (after.cache, after.body) == ("MISS", b"new")


async def test_default_ttl_applies_only_to_configured_statuses_without_caching_headers(cache_gateway, upstream):
    for path, status in (("/ok", 200), ("/moved", 301), ("/missing", 404), ("/found", 302), ("/error", 500)):
        upstream.answer(path, "x", status=status, headers={"Location": "/elsewhere"} if status in (301, 302) else {})
    cache = await cache_gateway('default_ttl = "60s"')
    for path in ("/ok", "/moved", "/missing", "/found", "/error"):
        await cache.get(path)
        await cache.get(path)
    hits = {path: upstream.hits(path) for path in ("/ok", "/moved", "/missing", "/found", "/error")}
    assert hits == {"/ok": 1, "/moved": 1, "/missing": 1, "/found": 2, "/error": 2}


async def test_without_default_ttl_responses_without_caching_headers_are_not_stored(cache_gateway, upstream):
    upstream.answer("/a", "x")
    cache = await cache_gateway()
    await cache.get("/a")
    await cache.get("/a")
    assert upstream.hits("/a") == 2


async def test_an_error_status_marked_cacheable_is_not_stored(cache_gateway, upstream):
    upstream.answer("/a", "boom", status=500, headers=FRESH)
    upstream.answer("/b", "bad", status=400, headers=FRESH)
    cache = await cache_gateway()
    for path in ("/a", "/b"):
        await cache.get(path)
        await cache.get(path)
    assert upstream.hits("/a") == upstream.hits("/b") == 2


async def test_vary_never_answers_another_language(cache_gateway, upstream):
    async def greeting(request):
        words = {"en": "hello", "fr": "bonjour", "de": "hallo"}
        body = words.get(request.headers.get("Accept-Language", ""), "hi")
        return web.Response(text=body, headers={"Cache-Control": "max-age=60", "Vary": "Accept-Language"})

    upstream.handler("/greet", greeting)
    cache = await cache_gateway()
    results = []
    for language in ("en", "fr", "en", "de", "fr", None, "de", None):
        reply = await cache.get("/greet", headers={"Accept-Language": language} if language else {})
        results.append((language, reply.body.decode(), reply.cache))
    assert results == [
        ("en", "hello", "MISS"), ("fr", "bonjour", "MISS"), ("en", "hello", "HIT"), ("de", "hallo", "MISS"),
        ("fr", "bonjour", "HIT"), (None, "hi", "MISS"), ("de", "hallo", "HIT"), (None, "hi", "HIT"),
    ]
    assert upstream.hits("/greet") == 4


async def test_vary_on_several_headers_and_vary_star(cache_gateway, upstream):
    async def varied(request):
        body = f"{request.headers.get('X-A')}/{request.headers.get('X-B')}"
        return web.Response(text=body, headers={"Cache-Control": "max-age=60", "Vary": "X-A, X-B"})

    upstream.handler("/two", varied)
    upstream.answer("/star", "s", headers={"Cache-Control": "max-age=60", "Vary": "*"})
    cache = await cache_gateway()
    first = await cache.get("/two", headers={"X-A": "1", "X-B": "2"})
    other = await cache.get("/two", headers={"X-A": "1", "X-B": "3"})
    again = await cache.get("/two", headers={"X-B": "2", "X-A": "1"})
    assert (first.body, other.body, other.cache, again.body, again.cache) == (b"1/2", b"1/3", "MISS", b"1/2", "HIT")
    await cache.get("/star")
    assert (await cache.get("/star")).cache == "MISS"


async def test_if_none_match_and_if_modified_since_are_answered_304_from_the_cache(cache_gateway, upstream):
    modified = format_http_date(time.time() - 3600)
    upstream.answer("/a", "body", headers={"Cache-Control": "max-age=60", "ETag": '"v1"', "Last-Modified": modified})
    cache = await cache_gateway()
    await cache.get("/a")
    matching = await cache.get("/a", headers={"If-None-Match": 'W/"v0", "v1"'})
    other = await cache.get("/a", headers={"If-None-Match": '"v2"'})
    since = await cache.get("/a", headers={"If-Modified-Since": format_http_date(time.time())})
    before = await cache.get("/a", headers={"If-Modified-Since": format_http_date(time.time() - 7200)})
    assert (matching.status, matching.body, matching.headers["ETag"], matching.cache) == (304, b"", '"v1"', "HIT")
    assert "Content-Type" not in matching.headers
    assert (other.status, other.body) == (200, b"body")
    assert (since.status, before.status) == (304, 200)
    assert upstream.hits("/a") == 1


async def test_a_conditional_miss_fetches_the_whole_body_and_answers_304(cache_gateway, upstream):
    upstream.answer("/a", "body", headers={"Cache-Control": "max-age=60", "ETag": '"v1"'})
    cache = await cache_gateway()
    first = await cache.get("/a", headers={"If-None-Match": '"v1"'})
    full = await cache.get("/a")
    assert (first.status, first.cache) == (304, "MISS")
    assert "If-None-Match" not in upstream.seen[0].headers
    assert (full.status, full.body, full.cache) == (200, b"body", "HIT")


async def test_stale_entries_are_revalidated_with_the_upstream(cache_gateway, upstream):
    version = {"etag": '"v1"', "body": "one"}

    async def etagged(request):
        if request.headers.get("If-None-Match") == version["etag"]:
            return web.Response(status=304, headers={"ETag": version["etag"], "Cache-Control": "max-age=60",
                                                     "X-Refreshed": "yes"})
        return web.Response(text=version["body"], headers={"ETag": version["etag"], "Cache-Control": "max-age=1"})

    upstream.handler("/a", etagged)
    cache = await cache_gateway()
    await cache.get("/a")
    await asyncio.sleep(1.1)
    revalidated = await cache.get("/a")
    assert upstream.seen[-1].headers.get("If-None-Match") == '"v1"'
    assert (revalidated.status, revalidated.body, revalidated.cache) == (200, b"one", "EXPIRED")
    assert revalidated.headers["X-Refreshed"] == "yes"
    hit = await cache.get("/a")
    assert (hit.cache, hit.body, hit.headers["Cache-Control"]) == ("HIT", b"one", "max-age=60")
    version.update(etag='"v2"', body="two")
    assert upstream.hits("/a") == 2


async def test_a_changed_resource_replaces_the_stale_entry(cache_gateway, upstream):
    upstream.answer("/a", "one", headers={"ETag": '"v1"', "Cache-Control": "max-age=1"})
    cache = await cache_gateway()
    await cache.get("/a")
    upstream.answer("/a", "two", headers={"ETag": '"v2"', "Cache-Control": "max-age=60"})
    await asyncio.sleep(1.1)
    changed = await cache.get("/a")
    assert (changed.body, changed.cache) == (b"two", "EXPIRED")
    assert ((await cache.get("/a")).body, upstream.hits("/a")) == (b"two", 2)


async def test_stale_while_revalidate_answers_at_once_and_refreshes_in_the_background(cache_gateway, upstream,
                                                                                      wait_until_async):
    upstream.answer("/a", "old", headers={"Cache-Control": "max-age=1, stale-while-revalidate=30"})
    cache = await cache_gateway()
    await cache.get("/a")
    await asyncio.sleep(1.1)
    upstream.answer("/a", "new", headers={"Cache-Control": "max-age=60"})
    upstream.gate = asyncio.Event()  # the upstream holds every request until the test opens it
    stale = await asyncio.wait_for(cache.get("/a"), 5)
    assert (stale.status, stale.body, stale.cache) == (200, b"old", "STALE")
    assert int(stale.headers["Age"]) >= 1
    await wait_until_async(lambda: upstream.hits("/a") == 2)  # the refresh waits at the gate meanwhile
    upstream.gate.set()

    async def refreshed():
        return (await cache.get("/a")).body == b"new"

    deadline = time.monotonic() + 10
    while not await refreshed():
        assert time.monotonic() < deadline, "the entry was never refreshed"
        await asyncio.sleep(0.02)
    assert upstream.hits("/a") == 2  # one background revalidation, however many stale answers


@pytest.mark.parametrize("store", ["memory", "shared"])
async def test_stale_while_revalidate_with_the_upstream_down(cache_gateway, upstream, store):
    """The upstream goes down: every background refresh fails (and is counted), the stale entry
    stays and is served until its stale-while-revalidate window ends; then stale-if-error serves
    it, or the client gets the error. Both responses carry one Date: their ages are now - date."""
    date = math.floor(time.time())
    window = "max-age=1, stale-while-revalidate=3"
    upstream.answer("/sie", "kept", headers={"Cache-Control": f"{window}, stale-if-error=60",
                                             "Date": format_http_date(date)})
    upstream.answer("/plain", "old", headers={"Cache-Control": window, "Date": format_http_date(date)})
    cache = await cache_gateway(f'store = "{store}"')
    assert [(await cache.get(path)).cache for path in ("/sie", "/plain")] == ["MISS", "MISS"]
    await upstream.server.close()  # connections refused from now on

    async def plain_until(leaves: str, deadline: float):
        while (reply := await cache.get("/plain")).cache == leaves:
            assert reply.body == b"old" and time.monotonic() < deadline, (reply.cache, reply.body)
            await asyncio.sleep(0.05)
        return reply

    stale = await plain_until("HIT", time.monotonic() + 10)
    assert (stale.status, stale.body, stale.cache) == (200, b"old", "STALE")
    await cache.wait_for_metric("plugway_cache_refresh_errors_total", 1)
    while cache.metric("plugway_cache_refresh_errors_total") < 2:  # the entry stayed; the next answer refreshes
        again = await cache.get("/plain")
        assert (again.status, again.body, again.cache) == (200, b"old", "STALE")
        await asyncio.sleep(0.05)
    after = await plain_until("STALE", time.monotonic() + 10)
    assert time.time() - date > 1 + 3  # served stale until the window ended...
    assert after.status == 502  # ...then the error (the entry, without a validator, is gone: a MISS)
    kept = await cache.get("/sie")  # as old, past its window too: stale-if-error
    assert (kept.status, kept.body, kept.cache) == (200, b"kept", "STALE")


async def test_stale_if_error_serves_stale_when_the_upstream_goes_down(cache_gateway, upstream):
    upstream.answer("/sie", "kept", headers={"Cache-Control": "max-age=1, stale-if-error=60"})
    upstream.answer("/plain", "gone", headers={"Cache-Control": "max-age=1"})
    cache = await cache_gateway()
    await cache.get("/sie")
    await cache.get("/plain")
    await upstream.server.close()  # the upstream goes down: connections refused from now on
    await asyncio.sleep(1.1)
    stale = await cache.get("/sie")
    lost = await cache.get("/plain")
    assert (stale.status, stale.body, stale.cache) == (200, b"kept", "STALE")
    assert lost.status == 502


async def test_stale_if_error_covers_5xx_answers_and_a_configured_default(cache_gateway, upstream):
    upstream.answer("/a", "kept", headers={"Cache-Control": "max-age=1"})
    cache = await cache_gateway('stale_if_error = "60s"')
    await cache.get("/a")
    upstream.answer("/a", "failing", status=503)
    await asyncio.sleep(1.1)
    stale = await cache.get("/a")
    assert (stale.status, stale.body, stale.cache) == (200, b"kept", "STALE")


async def test_must_revalidate_never_serves_stale(cache_gateway, upstream):
    upstream.answer("/a", "kept", headers={"Cache-Control": "max-age=1, must-revalidate"})
    cache = await cache_gateway('stale_if_error = "60s"\nstale_while_revalidate = "60s"')
    await cache.get("/a")
    upstream.answer("/a", "failing", status=503)
    await asyncio.sleep(1.1)
    after = await cache.get("/a")
    assert (after.status, after.body) == (503, b"failing")


async def test_set_cookie_responses_are_not_stored_unless_allowed(cache_gateway, upstream):
    upstream.answer("/a", "x", headers={"Cache-Control": "max-age=60", "Set-Cookie": "session=alice"})
    cache = await cache_gateway()
    await cache.get("/a")
    second = await cache.get("/a")
    assert (second.cache, second.headers["Set-Cookie"]) == ("MISS", "session=alice")


async def test_allowed_set_cookie_responses_are_stored_without_the_cookie(cache_gateway, upstream):
    upstream.answer("/a", "x", headers={"Cache-Control": "max-age=60", "Set-Cookie": "session=alice"})
    cache = await cache_gateway("allow_set_cookie = true")
    first = await cache.get("/a")
    second = await cache.get("/a")
    assert first.headers["Set-Cookie"] == "session=alice"
    assert second.cache == "HIT" and "Set-Cookie" not in second.headers


async def test_requests_with_authorization_use_only_entries_marked_shareable(cache_gateway, upstream):
    upstream.answer("/plain", "anonymous", headers=FRESH)
    upstream.answer("/public", "public", headers={"Cache-Control": "public, max-age=60"})
    cache = await cache_gateway()
    await cache.get("/plain")
    authorized = await cache.get("/plain", headers={"Authorization": "Bearer alice"})
    assert (authorized.cache, upstream.hits("/plain")) == ("MISS", 2)
    await cache.get("/plain", headers={"Authorization": "Bearer alice"})
    assert upstream.hits("/plain") == 3  # a response to an authorized request, not public: not stored
    await cache.get("/public", headers={"Authorization": "Bearer alice"})
    shared = await cache.get("/public", headers={"Authorization": "Bearer bob"})
    assert (shared.cache, upstream.hits("/public")) == ("HIT", 1)


async def test_authorization_bypass_and_per_principal_keys(cache_gateway, upstream):
    async def whoami(request):
        return web.Response(text=request.headers.get("Authorization", "nobody"),
                            headers={"Cache-Control": "max-age=60"})

    upstream.handler("/me", whoami)
    cache = await cache_gateway(route='[routes.plugins.cache]\nkey_extra = ["header:Authorization"]')
    replies = [await cache.get("/me", headers={"Authorization": who}) for who in ("alice", "bob", "alice", "bob")]
    assert [(reply.body, reply.cache) for reply in replies] == [
        (b"alice", "MISS"), (b"bob", "MISS"), (b"alice", "HIT"), (b"bob", "HIT")]


async def test_authorization_bypass_mode(cache_gateway, upstream):
    upstream.answer("/a", "x", headers={"Cache-Control": "public, max-age=60"})
    cache = await cache_gateway('authorization = "bypass"')
    replies = [await cache.get("/a", headers={"Authorization": "Bearer alice"}) for _ in range(2)]
    assert [reply.cache for reply in replies] == ["BYPASS", "BYPASS"] and upstream.hits("/a") == 2


async def test_head_is_answered_from_the_get_entry_with_its_length(cache_gateway, upstream):
    upstream.answer("/a", "x" * 1000, headers=FRESH)
    cache = await cache_gateway()
    head_miss = await cache.get("/a", method="HEAD")
    get_hit = await cache.get("/a")
    head_hit = await cache.get("/a", method="HEAD")
    assert upstream.seen[0].method == "GET"  # converted, so that the whole response is stored
    assert (head_miss.status, head_miss.body, head_miss.headers["Content-Length"]) == (200, b"", "1000")
    assert (get_hit.cache, get_hit.body) == ("HIT", b"x" * 1000)
    assert (head_hit.cache, head_hit.body, head_hit.headers["Content-Length"]) == ("HIT", b"", "1000")
    assert upstream.hits("/a") == 1


async def test_methods_get_only_leaves_head_to_the_upstream(cache_gateway, upstream):
    upstream.answer("/a", "x" * 1000, headers=FRESH)
    cache = await cache_gateway('methods = ["GET"]')
    assert (await cache.get("/a")).cache == "MISS"
    head = await cache.get("/a", method="HEAD")
    assert (head.status, head.cache, head.body) == (200, "BYPASS", b"")
    assert [seen.method for seen in upstream.seen] == ["GET", "HEAD"]  # sent as HEAD, not answered from the entry
    assert (await cache.get("/a")).cache == "HIT"  # and the GET entry is still there


async def test_larger_responses_stream_through_uncached(cache_gateway, upstream):
    big = bytes(range(256)) * 400  # 100 KiB
    first_part = 16384
    held: dict[str, asyncio.Event] = {}  # path -> the gate its upstream response waits at, past first_part

    async def in_two_parts(request):
        response = web.StreamResponse(headers=FRESH)
        if request.path == "/chunked":
            response.enable_chunked_encoding()
        else:
            response.content_length = len(big)
        await response.prepare(request)
        await response.write(big[:first_part])
        await held[request.path].wait()
        await response.write(big[first_part:])
        await response.write_eof()
        return response

    async def streamed(path: str) -> str:
        """The first part reaches the client while the upstream holds the rest; then the rest."""
        held[path] = asyncio.Event()
        try:
            async with asyncio.timeout(10), cache.running.client.get(path) as response:
                head = await response.content.readexactly(first_part)
                held[path].set()
                assert head + await response.read() == big
                return response.headers["X-Cache"]
        finally:
            held[path].set()  # (when it failed: the upstream must not wait for ever)

    upstream.handler("/known", in_two_parts)
    upstream.handler("/chunked", in_two_parts)
    upstream.answer("/small", b"s" * 1000, headers=FRESH)
    cache = await cache_gateway('max_object_size = "64KiB"')
    for path in ("/known", "/chunked"):
        assert [await streamed(path), await streamed(path)] == ["MISS", "MISS"]  # not stored
        assert upstream.hits(path) == 2
    await cache.get("/small")
    assert (await cache.get("/small")).cache == "HIT"


async def test_a_chunked_body_within_the_limit_is_stored_as_it_streams(cache_gateway, upstream):
    async def chunked(request):
        response = web.StreamResponse(headers={"Cache-Control": "max-age=60", "ETag": '"c"'})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for part in (b"one,", b"two,", b"three"):
            await response.write(part)
        await response.write_eof()
        return response

    upstream.handler("/a", chunked)
    cache = await cache_gateway()
    first = await cache.get("/a")

    async def stored():
        return (await cache.get("/a")).cache == "HIT"

    deadline = time.monotonic() + 5
    while not await stored():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    hit = await cache.get("/a")
    assert first.body == hit.body == b"one,two,three"
    assert hit.headers["Content-Length"] == "13" and hit.headers["ETag"] == '"c"'
    assert upstream.hits("/a") == 1


async def test_the_memory_store_is_bounded_in_bytes(cache_gateway, upstream):
    async def any_path(request):
        return web.Response(body=b"x" * 1000, headers=FRESH)

    for number in range(200):
        upstream.handler(f"/k/{number}", any_path)
    cache = await cache_gateway('memory_size = "64KiB"\nmax_object_size = "8KiB"')
    for number in range(200):
        await cache.get(f"/k/{number}")
    memory = cache.gateway.state["cache"].memory
    assert memory.bytes <= 64 * 1024
    assert cache.metric("plugway_cache_memory_bytes") == memory.bytes
    assert cache.metric("plugway_cache_memory_entries") == len(memory) < 200
    assert cache.metric("plugway_cache_evictions_total") == 200 - len(memory)
    assert (await cache.get("/k/199")).cache == "HIT"  # the most recent stay
    assert (await cache.get("/k/0")).cache == "MISS"  # the least recently used went


async def test_the_clients_cache_control_is_honoured(cache_gateway, upstream):
    upstream.answer("/a", "x", headers=FRESH)
    cache = await cache_gateway()
    await cache.get("/a")
    no_cache = await cache.get("/a", headers={"Cache-Control": "no-cache"})
    max_age = await cache.get("/a", headers={"Cache-Control": "max-age=0"})
    pragma = await cache.get("/a", headers={"Pragma": "no-cache"})
    assert [reply.cache for reply in (no_cache, max_age, pragma)] == ["EXPIRED"] * 3
    assert upstream.hits("/a") == 4
    only_if_cached = await cache.get("/cold", headers={"Cache-Control": "only-if-cached"})
    assert only_if_cached.status == 504 and upstream.hits("/cold") == 0
    await cache.get("/b", headers={"Cache-Control": "no-store"})
    upstream.answer("/b", "x", headers=FRESH)
    assert (await cache.get("/b")).cache == "MISS"


async def test_the_clients_cache_control_can_be_ignored(cache_gateway, upstream):
    upstream.answer("/a", "x", headers=FRESH)
    cache = await cache_gateway("honor_request_cache_control = false")
    await cache.get("/a")
    assert (await cache.get("/a", headers={"Cache-Control": "no-cache"})).cache == "HIT"


async def test_ranges_are_answered_whole_from_the_cache_and_bypass_it_otherwise(cache_gateway, upstream):
    upstream.answer("/a", "0123456789", headers=FRESH)
    cache = await cache_gateway()
    cold = await cache.get("/a", headers={"Range": "bytes=0-1"})
    assert cold.cache == "BYPASS" and upstream.seen[0].headers.get("Range") == "bytes=0-1"
    await cache.get("/a")
    hit = await cache.get("/a", headers={"Range": "bytes=0-1"})
    assert (hit.status, hit.body, hit.cache) == (200, b"0123456789", "HIT")


async def test_a_successful_unsafe_request_invalidates_the_entry(cache_gateway, upstream):
    upstream.answer("/a", "x", headers=FRESH)
    cache = await cache_gateway(route='methods = ["GET", "POST"]')
    await cache.get("/a")
    post = await cache.get("/a", method="POST")
    after = await cache.get("/a")
    assert post.cache == "BYPASS"
    assert after.cache == "MISS" and upstream.hits("/a") == 3


async def test_the_status_header_can_be_renamed_or_removed(cache_gateway, upstream):
    upstream.answer("/a", "x", headers=FRESH)
    cache = await cache_gateway('status_header = ""')
    started = time.monotonic()
    await cache.get("/a")
    hit = await cache.get("/a")
    assert "X-Cache" not in hit.headers
    assert_age(hit, started)
    assert upstream.hits("/a") == 1
