"""The breaker on a real gateway (in-process, its own store) in front of real misbehaving
upstreams: what opens it, what clients get while it is open, how it recovers, and what it
shows (metrics, the admin view)."""

import asyncio
import time

import aiohttp
import pytest

from gateway import PluginDeclaration, hookimpl
from gateway.config import ConfigErrors

FAST = 'consecutive_failures = 3\nopen_for = "300ms"'


async def statuses(gateway, count: int, path: str = "/api/x") -> list[int]:
    results = []
    for _ in range(count):
        async with gateway.client.get(path) as response:
            await response.read()
            results.append(response.status)
    return results


async def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def upstream_view(gateway) -> dict:
    async with aiohttp.ClientSession() as session, session.get(f"{gateway.admin_url}/upstreams") as response:
        return (await response.json())["upstreams"]["app"]


def state(gateway) -> float:
    return gateway.metric("plugway_breaker_state", upstream="app")


@pytest.mark.parametrize("mode, failure", [
    ("hole", 504),       # accepts and never answers: read timeouts
    ("refuse", 502),     # connection refused
    ("error", 500),      # answers 500
    ("slow", 504),       # answers after 1 s, past the 200 ms read timeout
])
async def test_each_kind_of_failure_opens_the_breaker(plugway_gateway, raw_upstream, mode, failure, breaker_config):
    upstream = await raw_upstream()
    await upstream.set_mode(mode)
    gateway = await plugway_gateway(breaker_config([upstream.url], 'consecutive_failures = 3\nopen_for = "30s"'))
    assert await statuses(gateway, 3) == [failure] * 3
    hits = upstream.hits
    async with gateway.client.get("/api/x") as response:
        body = await response.json()
    assert response.status == 503
    assert body["error"]["code"] == "circuit_open"
    assert '"app"' in body["error"]["message"]
    assert body["error"]["request_id"] == response.headers["X-Request-ID"]
    assert 29 <= int(response.headers["Retry-After"]) <= 30
    assert upstream.hits == hits  # refused without reaching (or waiting on) the upstream
    assert state(gateway) == 1
    assert gateway.metric("plugway_breaker_transitions_total", upstream="app", to="open") == 1
    assert gateway.metric("plugway_breaker_rejected_total", upstream="app") == 1


async def test_a_body_cut_short_counts_as_a_failure(plugway_gateway, raw_upstream, breaker_config):
    upstream = await raw_upstream("cut")
    gateway = await plugway_gateway(breaker_config([upstream.url], FAST))
    for _ in range(3):
        with pytest.raises(aiohttp.ClientPayloadError):
            async with gateway.client.get("/api/x") as response:
                assert response.status == 200  # the head was fine
                await response.read()
    await wait_for(lambda: state(gateway) == 1)
    assert (await statuses(gateway, 1)) == [503]


async def test_slow_answers_within_the_timeout_are_successes(plugway_gateway, raw_upstream, breaker_config):
    upstream = await raw_upstream("slow", delay=0.05)
    gateway = await plugway_gateway(breaker_config([upstream.url], 'consecutive_failures = 2'))
    assert await statuses(gateway, 4) == [200] * 4
    assert state(gateway) == 0


async def test_failure_statuses_are_configurable(plugway_gateway, raw_upstream, breaker_config):
    upstream = await raw_upstream("error")
    plugin = 'consecutive_failures = 2\nfailure_statuses = [502, "503-504"]'
    gateway = await plugway_gateway(breaker_config([upstream.url], plugin))
    assert await statuses(gateway, 5) == [500] * 5  # 500 is not a failure here
    assert state(gateway) == 0


async def test_the_breaker_half_opens_after_open_for_and_one_probe_closes_it(plugway_gateway, raw_upstream,
                                                                               breaker_config):
    upstream = await raw_upstream("error")
    gateway = await plugway_gateway(breaker_config([upstream.url], FAST))
    await statuses(gateway, 3)
    assert state(gateway) == 1
    await upstream.set_mode("ok")
    opened = time.monotonic()
    await wait_for(lambda: state(gateway) == 2)  # the clock makes it half-open
    assert time.monotonic() - opened >= 0.25
    assert await statuses(gateway, 3) == [200, 200, 200]  # the probe, then closed
    assert state(gateway) == 0
    for to in ("open", "half_open", "closed"):
        assert gateway.metric("plugway_breaker_transitions_total", upstream="app", to=to) == 1


async def test_a_failed_probe_reopens_for_twice_as_long(plugway_gateway, raw_upstream, breaker_config):
    upstream = await raw_upstream("error")
    gateway = await plugway_gateway(breaker_config([upstream.url], FAST + '\nopen_for_max = "1s"'))
    await statuses(gateway, 3)
    first = (await upstream_view(gateway))["breaker"]
    await wait_for(lambda: state(gateway) == 2)
    assert await statuses(gateway, 2) == [500, 503]  # the probe fails, then open again
    second = (await upstream_view(gateway))["breaker"]
    assert second["state"] == "open" and second["failed_probe_rounds"] == 1
    assert second["reason"] == "a half-open probe failed"

    def length(view):
        from datetime import datetime
        return (datetime.fromisoformat(view["open_until"]) - datetime.fromisoformat(view["opened_at"])).total_seconds()

    assert length(first) == pytest.approx(0.3, abs=0.01) and length(second) == pytest.approx(0.6, abs=0.01)


async def test_half_open_lets_exactly_half_open_probes_through(plugway_gateway, raw_upstream, breaker_config):
    upstream = await raw_upstream("error")
    gateway = await plugway_gateway(breaker_config([upstream.url], FAST + "\nhalf_open_probes = 2"))
    await statuses(gateway, 3)
    upstream.delay = 0.15  # within the 200 ms read timeout
    await upstream.set_mode("slow")  # probes stay in flight while the others arrive
    await wait_for(lambda: state(gateway) == 2)
    hits = upstream.hits
    results = await asyncio.gather(*(statuses(gateway, 1) for _ in range(6)))
    assert sorted(status for [status] in results) == [200, 200, 503, 503, 503, 503]
    assert upstream.hits - hits == 2
    assert state(gateway) == 0  # both probes succeeded


async def test_a_client_that_goes_away_is_neither_success_nor_failure(plugway_gateway, raw_upstream, breaker_config):
    upstream = await raw_upstream("hole")
    gateway = await plugway_gateway(breaker_config([upstream.url], "consecutive_failures = 2",
                                                   upstream='read_timeout = "5s"'))
    for _ in range(4):
        with pytest.raises(asyncio.TimeoutError):
            async with asyncio.timeout(0.1):
                await statuses(gateway, 1)
    await wait_for(lambda: upstream.hits >= 4)
    await asyncio.sleep(0.1)  # time for the gateway to notice the clients left
    assert state(gateway) == 0
    await upstream.set_mode("ok")
    assert await statuses(gateway, 1) == [200]


async def test_a_static_fallback_answers_while_open(plugway_gateway, raw_upstream, breaker_config):
    upstream = await raw_upstream("error")
    plugin = FAST + '\n[plugins.breaker.fallback]\nstatus = 200\nbody = \'{"items": []}\'\n' \
        'headers = { Content-Type = "application/json", X-Fallback = "breaker" }'
    gateway = await plugway_gateway(breaker_config([upstream.url], plugin))
    await statuses(gateway, 3)
    async with gateway.client.get("/api/x") as response:
        assert response.status == 200
        assert await response.json() == {"items": []}
        assert response.headers["X-Fallback"] == "breaker"
        assert "Retry-After" not in response.headers  # not a 503
    assert gateway.metric("plugway_breaker_rejected_total", upstream="app") == 1


async def test_a_fallback_upstream_answers_while_open(plugway_gateway, raw_upstream, breaker_config):
    upstream, spare = await raw_upstream("refuse"), await raw_upstream("ok")
    extra = f'[[upstreams]]\nname = "spare"\ntargets = [{{ url = "{spare.url}" }}]'
    gateway = await plugway_gateway(breaker_config([upstream.url], FAST + '\nfallback_upstream = "spare"', extra=extra))
    assert await statuses(gateway, 3) == [502, 502, 502]
    assert await statuses(gateway, 5) == [200] * 5
    assert spare.hits == 5
    assert state(gateway) == 1  # the spare's answers do not close the breaker of "app"


async def test_the_admin_view_shows_the_breaker(plugway_gateway, raw_upstream, breaker_config):
    upstream = await raw_upstream("error")
    gateway = await plugway_gateway(breaker_config([upstream.url], 'consecutive_failures = 2\nopen_for = "1m"'))
    assert (await upstream_view(gateway))["breaker"] == {
        "state": "closed", "opened_at": None, "open_until": None, "reason": None, "failed_probe_rounds": 0,
        "shared": "host",
    }
    await statuses(gateway, 2)
    view = (await upstream_view(gateway))["breaker"]
    assert view["state"] == "open" and view["reason"] == "2 consecutive failures"
    assert view["opened_at"].endswith("Z") and view["open_until"] > view["opened_at"]


def target_state(gateway, target) -> float:
    return gateway.metric("plugway_breaker_target_state", upstream="app", target=target.url)


async def test_per_target_breakers_steer_requests_away_from_an_open_target(plugway_gateway, raw_upstream,
                                                                           breaker_config):
    good, bad = await raw_upstream("ok"), await raw_upstream("error")
    gateway = await plugway_gateway(breaker_config([good.url, bad.url], FAST + "\nper_target = true"))
    results = await statuses(gateway, 6)  # round robin: good, bad, good, bad...
    assert results == [200, 500] * 3
    assert target_state(gateway, bad) == 1 and target_state(gateway, good) == 0
    assert state(gateway) == 0  # one target still closed: the upstream serves
    view = (await upstream_view(gateway))["breaker"]
    assert view["per_target"] and view["targets"][bad.url]["state"] == "open"
    hits = bad.hits
    assert await statuses(gateway, 6) == [200] * 6  # all to the good target while the bad one is open
    assert bad.hits == hits
    assert gateway.metric("plugway_breaker_rejected_total", upstream="app") == 0


async def in_flight_to(gateway, upstream) -> asyncio.Task:
    """Sends requests one at a time until one reaches ``upstream``; returns that one, still in flight."""
    hits = upstream.hits
    while True:
        request = asyncio.create_task(statuses(gateway, 1))
        await wait_for(lambda: request.done() or upstream.hits > hits)
        if upstream.hits > hits:
            return request
        assert request.result() == [200]


async def test_a_half_open_target_gets_exactly_its_probes_and_closes(plugway_gateway, raw_upstream, breaker_config):
    good, bad = await raw_upstream("ok"), await raw_upstream("error")
    gateway = await plugway_gateway(breaker_config([good.url, bad.url], FAST + "\nper_target = true",
                                                   upstream='read_timeout = "60s"'))
    await statuses(gateway, 6)
    assert target_state(gateway, bad) == 1
    await bad.set_mode("held")  # the probe stays in flight while the others arrive
    await wait_for(lambda: target_state(gateway, bad) == 2)  # the clock makes it half-open
    hits = bad.hits
    probe = await in_flight_to(gateway, bad)  # the balancer may send the probe holder elsewhere first
    others = await asyncio.gather(*(statuses(gateway, 1) for _ in range(6)))
    assert others == [[200]] * 6  # half_open_probes = 1: the others went to the good target
    bad.release.set()
    assert await probe == [200]
    assert bad.hits - hits == 1
    assert target_state(gateway, bad) == 0  # the probe succeeded
    await bad.set_mode("ok")
    hits = bad.hits
    assert await statuses(gateway, 4) == [200] * 4
    assert bad.hits - hits == 2  # back in the rotation


def retried(gateway) -> float:
    return gateway.metric("plugway_upstream_retries_total", upstream="app", reason="upstream_unreachable")


async def test_failures_the_core_retried_on_another_target_open_that_target(plugway_gateway, raw_upstream,
                                                                            breaker_config):
    good, bad = await raw_upstream("ok"), await raw_upstream("ok")
    await bad.set_mode("refuse")
    gateway = await plugway_gateway(breaker_config([good.url, bad.url], FAST + "\nper_target = true"))
    assert await statuses(gateway, 6) == [200] * 6  # each refused try was retried on the good target
    assert retried(gateway) == 3
    assert target_state(gateway, bad) == 1
    assert await statuses(gateway, 6) == [200] * 6
    assert retried(gateway) == 3  # the open target is not tried any more
    await wait_for(lambda: target_state(gateway, bad) == 2)
    await statuses(gateway, 2)  # one of them probes the target, which still refuses: open again
    assert retried(gateway) == 4
    assert target_state(gateway, bad) == 1
    assert (await upstream_view(gateway))["breaker"]["targets"][bad.url]["failed_probe_rounds"] == 1


async def test_per_target_breakers_refuse_when_every_target_is_open(plugway_gateway, raw_upstream, breaker_config):
    first, second = await raw_upstream("error"), await raw_upstream("error")
    gateway = await plugway_gateway(breaker_config([first.url, second.url],
                                                   'consecutive_failures = 3\nopen_for = "30s"\nper_target = true'))
    assert await statuses(gateway, 6) == [500] * 6
    await wait_for(lambda: state(gateway) == 1)
    hits = first.hits + second.hits
    async with gateway.client.get("/api/x") as response:
        assert response.status == 503 and (await response.json())["error"]["code"] == "circuit_open"
        assert 29 <= int(response.headers["Retry-After"]) <= 30
    assert first.hits + second.hits == hits


class Redirect:
    """Sends every request to the "spare" upstream in before_upstream, as a routing plugin might."""

    @hookimpl
    def declare_plugin(self):
        return PluginDeclaration(priority=10)

    @hookimpl
    def before_upstream(self, outgoing):
        outgoing.upstream_name = "spare"


async def test_answers_of_an_upstream_another_plugin_chose_do_not_count(plugway_gateway, raw_upstream, breaker_config):
    upstream, spare = await raw_upstream("ok"), await raw_upstream("error")
    extra = f'[[upstreams]]\nname = "spare"\ntargets = [{{ url = "{spare.url}" }}]\n[plugins.redirect]'
    gateway = await plugway_gateway(breaker_config([upstream.url], FAST, extra=extra), plugins={"redirect": Redirect()})
    assert await statuses(gateway, 5) == [500] * 5
    assert state(gateway) == 0


async def test_a_dead_store_leaves_each_worker_its_own_breaker(plugway_gateway, raw_upstream, refusing_url,
                                                               breaker_config):
    upstream = await raw_upstream("error")
    port = refusing_url.rsplit(":", 1)[1]
    store = f'backend = "redis"\nurl = "redis://127.0.0.1:{port}/0"\ntimeout = "50ms"'
    gateway = await plugway_gateway(breaker_config([upstream.url], FAST + '\nshared = "store"', store=store))
    assert await statuses(gateway, 4) == [500, 500, 500, 503]
    assert gateway.metric("plugway_breaker_store_errors_total") >= 1
    view = (await upstream_view(gateway))["breaker"]
    assert view["state"] == "open" and view["shared"] == "store (unavailable: per worker)"
    await upstream.set_mode("ok")
    await wait_for(lambda: state(gateway) == 2)
    assert await statuses(gateway, 2) == [200, 200]


@pytest.mark.parametrize("plugin, extra, error", [
    ('fallback_upstream = "nowhere"', "", 'plugins.breaker.fallback_upstream: unknown upstream "nowhere"'),
    ("consecutive_failures = 0\nfailure_ratio = 0", "", "cannot both be 0"),
    ('failure_statuses = ["5xx"]', "", "plugins.breaker.failure_statuses: '5xx' is neither a status"),
    ('fallback_upstream = "app"\n[plugins.breaker.fallback]\nstatus = 503', "", "not both"),
    ("", '[[routes]]\nname = "other"\nprefix = "/other"\nupstream = "app"\n'
         '[routes.plugins.breaker]\nopen_for = "5s"',
     'routes[1].plugins.breaker: routes on upstream "app" share one breaker, but route "api"'),
])
async def test_invalid_settings_are_refused_with_their_path(plugway_gateway, plugin, extra, error, breaker_config):
    with pytest.raises(ConfigErrors) as refused:
        await plugway_gateway(breaker_config(["http://127.0.0.1:9"], plugin, extra=extra))
    assert error in str(refused.value)


async def test_a_route_may_change_only_the_answer_while_open(plugway_gateway, raw_upstream, breaker_config):
    upstream = await raw_upstream("error")
    extra = ('[[routes]]\nname = "other"\nprefix = "/other"\nupstream = "app"\n'
             '[routes.plugins.breaker]\nfallback = { status = 503, body = "come back later" }')
    gateway = await plugway_gateway(breaker_config([upstream.url], FAST, extra=extra))
    await statuses(gateway, 3)
    async with gateway.client.get("/other") as response:  # the same breaker, its own answer
        assert response.status == 503 and await response.text() == "come back later"
        assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert int(response.headers["Retry-After"]) == 1
