"""Exact limits across the workers of a host (real supervisor) and across hosts (real Redis)."""

import asyncio
import math
import signal
import subprocess
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

import pytest
from aiohttp import web

from gateway.testing import proxy_config, route_table, wait_until


async def ok(request):
    return web.Response(text="ok")


@pytest.fixture
async def upstream(aiohttp_raw_server):
    server = await aiohttp_raw_server(ok)
    return str(server.make_url("")).rstrip("/")


def config(upstream: str, *, workers: int, plugin: str, store: str = 'timeout = "2s"', routes: str = "") -> str:
    """Accuracy tests give the store 2 s: on a machine busy with other tests a 100 ms timeout
    would fail open (by policy) and let extra requests through, which is not what they test."""
    plugins = f"[store]\n{textwrap.dedent(store)}\n[plugins.ratelimit]\n{textwrap.dedent(plugin)}"
    return proxy_config(upstream, server=f"workers = {workers}", routes=routes, plugins=plugins)


async def exchange(port: int, path: str = "/api/x", headers: str = "") -> bytes:
    """A request on a new connection, so the kernel spreads them over every worker's socket."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: h\r\n{headers}Connection: close\r\n\r\n".encode())
    answer = await reader.read(-1)
    writer.close()
    return answer


async def one_request(port: int) -> int:
    return int((await exchange(port))[9:12])


async def burst(ports: list[int], count: int, concurrency: int = 50, statuses: Counter | None = None,
                more: Callable[[], bool] = lambda: False) -> Counter:
    """``count`` requests, ``concurrency`` at a time, then more while ``more()`` holds."""
    statuses = Counter() if statuses is None else statuses
    sent = 0

    async def client():
        nonlocal sent
        while sent < count or more():
            port = ports[sent % len(ports)]
            sent += 1
            statuses[await one_request(port)] += 1

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return statuses


TOKEN_BUCKET = '[[plugins.ratelimit.limits]]\nkey = "global"\nrate = "100/m"\n'
SLIDING = '[[plugins.ratelimit.limits]]\nkey = "global"\nrate = "100/m"\nalgorithm = "sliding_window"\n'


def assert_exactly_100(statuses: Counter, elapsed: float) -> None:
    """Exactly 100, plus whatever the bucket refilled during the burst (100/m: one token per 0.6 s)."""
    refill = math.floor(elapsed * 100 / 60)
    print(f"allowed {statuses[200]} of {sum(statuses.values())} in {elapsed:.2f}s (refill allowance {refill})")
    assert set(statuses) <= {200, 429}, statuses
    assert 100 <= statuses[200] <= 100 + refill


async def test_token_bucket_is_exact_across_four_workers(plugway_process, upstream):
    gateway = plugway_process(config(upstream, workers=4, plugin=TOKEN_BUCKET))
    gateway.wait_for_workers(4)
    started = time.monotonic()
    statuses = await burst([gateway.port], 1000)
    assert_exactly_100(statuses, time.monotonic() - started)


async def test_sliding_window_never_exceeds_the_limit_across_four_workers(plugway_process, upstream):
    gateway = plugway_process(config(upstream, workers=4, plugin=SLIDING))
    gateway.wait_for_workers(4)
    statuses = await burst([gateway.port], 1000)
    print(f"sliding window allowed {statuses[200]} of 1000")
    assert set(statuses) <= {200, 429} and 0 < statuses[200] <= 100


async def test_the_local_store_keeps_counting_across_a_reload(plugway_process, upstream):
    gateway = plugway_process(config(upstream, workers=2, plugin=TOKEN_BUCKET))
    gateway.wait_for_workers(2)
    started = time.monotonic()
    first = await burst([gateway.port], 500)
    gateway.signal(signal.SIGHUP)  # new workers; the store process stays
    second = await burst([gateway.port], 500)
    gateway.wait_for_workers(2, generation=2)
    assert_exactly_100(first + second, time.monotonic() - started)
    assert first[200] >= 100 - 1 and second[200] <= 1 + math.floor((time.monotonic() - started) * 100 / 60)


def reload_once_answered(gateway, answered: Callable[[], int], count: int) -> subprocess.CompletedProcess:
    """``plugway reload`` (which waits until the new generation serves) once ``count`` answers are in."""
    wait_until(lambda: answered() >= count, timeout=60)
    return gateway.cli("reload")


PER_DAY = '[[plugins.ratelimit.limits]]\nkey = "global"\nrate = "100/24h"\nalgorithm = "{}"\n'


@pytest.mark.parametrize("algorithm", ["token_bucket", "sliding_window"])
async def test_exactly_the_limit_across_a_reload_in_the_middle_of_the_burst(plugway_process, upstream, algorithm):
    """100 a day: the bucket refills a token in 14 min and the day's window starts at midnight UTC,
    so exactly 100 of the burst pass. The reload starts after 200 answers and the burst goes on
    until it has finished, so old and new workers answer it side by side."""
    gateway = plugway_process(config(upstream, workers=4, plugin=PER_DAY.format(algorithm)))
    gateway.wait_for_workers(4)
    statuses: Counter = Counter()
    reload = asyncio.create_task(asyncio.to_thread(reload_once_answered, gateway, statuses.total, 200))
    await burst([gateway.port], 1000, statuses=statuses, more=lambda: not reload.done())
    assert reload.result().returncode == 0, reload.result().stderr
    assert gateway.status()["generation"] == 2
    after = await burst([gateway.port], 50)  # the new generation alone
    print(f"{algorithm}: {dict(statuses)} during the reload, then {dict(after)}")
    assert set(statuses) <= {200, 429} and statuses[200] == 100
    assert after == {429: 50}


async def test_two_hosts_sharing_redis_share_the_limit(plugway_process, redis_server, upstream):
    redis = redis_server()
    store = f'backend = "redis"\nurl = "{redis.url}"\ntimeout = "2s"'
    gateways = [plugway_process(config(upstream, workers=2, plugin=TOKEN_BUCKET, store=store)) for _ in range(2)]
    started = time.monotonic()
    statuses = await burst([g.port for g in gateways], 1000)
    assert_exactly_100(statuses, time.monotonic() - started)
    assert int(redis.cli("dbsize")) == 1  # one bucket, hash-tagged, under the key prefix
    assert redis.cli("keys", "*").startswith("plugway:rl:{")


async def test_two_hosts_sharing_a_redis_cluster_share_the_limit(plugway_process, redis_cluster, upstream):
    nodes = redis_cluster(3)
    store = f'backend = "redis"\nurl = "{nodes[0].url}"\ncluster = true\ntimeout = "2s"'
    plugin = TOKEN_BUCKET + '[[plugins.ratelimit.limits]]\nname = "per_ip"\nkey = "ip"\nrate = "1000/m"\n'
    gateways = [plugway_process(config(upstream, workers=2, plugin=plugin, store=store)) for _ in range(2)]
    started = time.monotonic()
    statuses = await burst([g.port for g in gateways], 1000)
    assert_exactly_100(statuses, time.monotonic() - started)
    keys = sum(int(node.cli("dbsize")) for node in nodes)
    assert keys == 2  # the global bucket and the per-IP one, wherever their slots live


class Answer(NamedTuple):
    sent: float  # time.monotonic() when the request was sent
    answered: float  # time.monotonic() when its answer (or the failure) came back
    seq: int  # its number, sent in X-Seq
    status: int  # 0: the connection failed or closed without an answer
    policy_503: bool  # a 503 carrying the plugin's own rate_limit_unavailable error


async def constant_rate(port: int, rate: float, until: asyncio.Event, log: list, path: str = "/api/x") -> None:
    """Requests at a fixed rate until told to stop, each numbered; logs an Answer for each."""
    tasks = []

    async def record(seq: int):
        sent = time.monotonic()
        try:
            answer = await exchange(port, path, f"X-Seq: {seq}\r\n")
            status = int(answer[9:12])
        except (OSError, ValueError):
            answer, status = b"", 0
        log.append(Answer(sent, time.monotonic(), seq, status, status == 503 and b'"rate_limit_unavailable"' in answer))

    while not until.is_set():
        tasks.append(asyncio.create_task(record(len(tasks))))
        await asyncio.sleep(1 / rate)
    await asyncio.gather(*tasks)


async def until(condition: Callable[[], bool], timeout: float = 60) -> None:
    """wait_until for conditions met by tasks of the test's own event loop."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"condition not met within {timeout}s"
        await asyncio.sleep(0.05)


def answered_since(log: list[Answer], since: float, count: int) -> bool:
    return sum(1 for answer in log if answer.sent > since) >= count


PROBE_ROUTE = route_table("probe", ratelimit='limits = [{ key = "header:X-Seq", rate = "10/h" }]')


@pytest.mark.parametrize("policy", ["fail_open", "fail_closed", "local"])
async def test_redis_dying_and_coming_back_under_load(plugway_process, redis_server, upstream, policy):
    """Load on /api (20/s, burst 20) at 60 requests a second, and 10 probes a second on /probe,
    each under a key of its own that no store refuses: a probe checked in Redis leaves its key
    there. Every probe sent more than 2 s after Redis answers again must have been counted in
    Redis (times are when requests were sent, never when answers came back)."""
    redis = redis_server()
    store = f'backend = "redis"\nurl = "{redis.url}"\ntimeout = "1s"\nretry_interval = "500ms"'
    plugin = f'on_store_error = "{policy}"\n[[plugins.ratelimit.limits]]\nkey = "global"\nrate = "20/s"\nburst = 20\n'
    gateway = plugway_process(config(upstream, workers=2, plugin=plugin, store=store, routes=PROBE_ROUTE))
    load: list[Answer] = []
    probes: list[Answer] = []
    stop = asyncio.Event()
    running = asyncio.gather(constant_rate(gateway.port, 60, stop, load),
                             constant_rate(gateway.port, 10, stop, probes, "/probe/x"))
    await until(lambda: {200, 429} <= {answer.status for answer in load})  # limited as usual
    killed_at = time.monotonic()
    redis.kill()
    dead_at = time.monotonic()
    await until(lambda: answered_since(load, dead_at, 120))
    restarted_at = time.monotonic()
    redis.start()  # same port, empty
    back_at = time.monotonic()  # it answers
    await until(lambda: answered_since(probes, back_at + 2, 10) and answered_since(load, back_at + 2, 60))
    stop.set()
    await running

    statuses = Counter(answer.status for answer in load + probes)
    before = Counter(a.status for a in load if a.answered < killed_at)  # in flight at the kill: either
    during = Counter(a.status for a in load if dead_at < a.sent and a.answered < restarted_at)
    late = Counter(a.status for a in load if a.sent > back_at + 2)
    print(f"{policy}: before {dict(before)}, while Redis was down {dict(during)}, 2 s after it came back {dict(late)}")
    assert 0 not in statuses  # no connection dropped
    assert set(statuses) <= ({200, 429, 503} if policy == "fail_closed" else {200, 429}), statuses
    assert all(a.policy_503 for a in load + probes if a.status == 503)  # only the policy's own 503
    assert set(before) == {200, 429}
    if policy == "fail_open":
        assert set(during) == {200}
    elif policy == "fail_closed":
        assert set(during) == {503}
    else:
        assert set(during) == {200, 429}  # the host-local store limits meanwhile
    assert set(late) == {200, 429}

    keys = set(redis.cli("keys", "*").split())
    in_redis = [a for a in probes if a.sent > back_at and f"plugway:rl:{{probe:default:{a.seq}}}" in keys]
    recovered = min((a.sent - back_at for a in in_redis), default=float("inf"))
    print(f"first probe counted in Redis: sent {recovered:.2f}s after Redis came back")
    late_probes = [a for a in probes if a.sent > back_at + 2]
    assert late_probes and all(a.status == 200 for a in late_probes)
    assert [a.seq for a in late_probes if a not in in_redis] == []
    bucket = "plugway:rl:{api:default:*}"  # the global limit counts in Redis again
    assert int(redis.cli("pttl", bucket)) > 0 and float(redis.cli("hget", bucket, "t")) < 20
