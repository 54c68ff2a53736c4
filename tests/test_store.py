"""The store interface against every backend: in-process, the local store process, Redis, Redis Cluster;
Redis with passwords, TLS and Sentinel; the store process restarted by a real supervisor."""

import asyncio
import multiprocessing
import os
import stat
import signal
import subprocess

import pytest

from gateway.config.model import StoreSettings
from gateway.config.units import Duration
from gateway.store import InProcessStore, Limit, StoreUnavailable
from gateway.store.local import LocalStore, run_store_process
from gateway.store.memory import KEY_OVERHEAD, MemoryTable
from gateway.testing import free_port, wait_until


@pytest.fixture
def local_store_path(tmp_path):
    path = str(tmp_path / "store.sock")
    process = multiprocessing.get_context("fork").Process(target=run_store_process, args=(path, 10_000, 1 << 24))
    process.start()
    wait_until(lambda: os.path.exists(path))
    yield path
    process.terminate()
    process.join()


@pytest.fixture(params=["in-process", "local", "redis", "redis-cluster"])
async def store(request, tmp_path):
    kind = request.param
    if kind == "in-process":
        yield InProcessStore(10_000, 1 << 24)
        return
    if kind == "local":
        path = request.getfixturevalue("local_store_path")
        store = LocalStore(path, 1.0)
    else:
        from gateway.store.redis import RedisStore

        if kind == "redis":
            url = request.getfixturevalue("redis_server")().url
            store = RedisStore(StoreSettings(backend="redis", url=url, timeout=1.0))
        else:
            nodes = request.getfixturevalue("redis_cluster")(3)
            store = RedisStore(StoreSettings(backend="redis", url=nodes[0].url, cluster=True, timeout=1.0))
    await store.connect()
    yield store
    await store.close()


async def test_keys_values_and_expiry(store):
    await store.set("k", b"value", None)
    assert await store.get("k") == b"value"
    await store.set("short", b"x", 0.2)
    assert await store.get("short") == b"x"
    await asyncio.sleep(0.35)
    assert await store.get("short") is None
    assert await store.delete("k", "missing") == 1
    assert await store.get("k") is None


async def test_counters_and_first_writer_wins(store):
    assert await store.incr("n") == 1
    assert await store.incr("n", 5) == 6
    assert await store.add("lock", b"a", 5) is True
    assert await store.add("lock", b"b", 5) is False
    assert await store.get("lock") == b"a"


async def test_sets_and_purging_by_prefix(store):
    assert await store.set_add("{tag}:t1", "a", "b", ttl=60) == 2
    assert await store.set_add("{tag}:t1", "b", "c") == 3
    assert await store.set_members("{tag}:t1") == ["a", "b", "c"]
    for key in ("cache:/a/1", "cache:/a/2", "cache:/b/1"):
        await store.set(key, b"x", 60)
    assert await store.delete_prefix("cache:/a/") == 2
    assert await store.get("cache:/b/1") == b"x"


async def test_a_counter_keeps_the_expiry_it_was_created_with(store):
    assert await store.incr("c", 1, ttl=0.3) == 1
    assert await store.incr("c", -1) == 0
    assert await store.incr("c", 1, ttl=60) == 1  # back to the amount added: not a new counter
    await asyncio.sleep(0.5)
    assert await store.get("c") is None
    await store.set("n", b"5", None)
    assert await store.incr("n") == 6  # a number written with set counts, on every backend


async def test_adding_to_a_set_extends_its_expiry_and_never_shortens_it(store):
    await store.set_add("{tag}:short", "a", ttl=0.3)
    await store.set_add("{tag}:short", "b", ttl=60)
    await store.set_add("{tag}:long", "a", ttl=60)
    await store.set_add("{tag}:long", "b", ttl=0.3)
    await asyncio.sleep(0.5)
    assert await store.set_members("{tag}:short") == ["a", "b"]
    assert await store.set_members("{tag}:long") == ["a", "b"]


async def test_rate_limits_are_all_or_nothing(store):
    tight = Limit("rl:{t}", "token_bucket", 2, 3600)
    loose = Limit("rl:{l}", "token_bucket", 100, 3600)
    assert [r.allowed for r in await store.take([tight, loose])] == [True, True]
    assert [r.allowed for r in await store.take([tight, loose])] == [True, True]
    refused = await store.take([tight, loose])
    assert not refused[0].allowed and refused[0].retry_after > 0
    (after,) = await store.take([loose])
    assert after.remaining == 97  # the refused request took nothing from the loose limit


async def test_sliding_window_counts_within_the_limit(store):
    limit = Limit("rl:{w}", "sliding_window", 3, 3600)
    results = [(await store.take([limit]))[0].allowed for _ in range(5)]
    assert results == [True, True, True, False, False]


async def test_the_local_store_socket_appears_listening_and_private(local_store_path):
    """The fixture waited only for the path to exist: a store that showed the path before it
    listened would refuse this first call."""
    assert stat.S_IMODE(os.stat(local_store_path).st_mode) == 0o600
    store = LocalStore(local_store_path, 5.0)
    assert await store.incr("first") == 1
    await store.close()


async def test_an_unreachable_store_raises_store_unavailable(tmp_path):
    from gateway.store.redis import RedisStore

    stores = [LocalStore(str(tmp_path / "nobody.sock"), 0.2),
              RedisStore(StoreSettings(backend="redis", url=f"redis://127.0.0.1:{free_port()}/0", timeout=0.2))]
    for store in stores:
        for operation in (store.get("k"), store.delete_prefix("cache:")):
            with pytest.raises(StoreUnavailable):
                await operation
        await store.close()


async def test_the_local_store_refuses_one_oversized_value_and_keeps_serving(local_store_path):
    store = LocalStore(local_store_path, 5.0)
    pending = asyncio.ensure_future(store.incr("n"))
    with pytest.raises(StoreUnavailable, match="frame limit"):
        await store.set("big", b"x" * (17 << 20), None)
    assert await pending == 1  # the other operations on the connection were not failed
    await store.set("ttl", b"v", Duration("60s"))  # a float subclass, which marshal alone refuses
    assert await store.get("ttl") == b"v"
    await store.close()


def test_sets_grow_in_place_with_their_bytes_accounted():
    table = MemoryTable(max_keys=100, max_bytes=1 << 20, clock=lambda: 0.0)
    table.set_add("s", ["a", "b"], None)
    table.set_add("s", ["b", "c"], None)
    assert table.set_members("s") == ["a", "b", "c"]
    assert table.get("s") == frozenset("abc")
    assert table.bytes == KEY_OVERHEAD + 1 + 3 * 81
    table.delete(["s"])
    assert table.bytes == 0


def test_the_table_is_bounded_in_keys_and_bytes_least_recently_used_first():
    now = [0.0]
    table = MemoryTable(max_keys=3, max_bytes=10_000, clock=lambda: now[0])
    for key in "abc":
        table.set(key, b"v", None)
    table.get("a")  # a is now the most recently used
    table.set("d", b"v", None)
    assert (table.get("a"), table.get("b"), table.get("d")) == (b"v", None, b"v")
    small = MemoryTable(max_keys=100, max_bytes=KEY_OVERHEAD * 2 + 2000, clock=lambda: now[0])
    small.set("x", b"1" * 1000, None)
    small.set("y", b"2" * 1000, None)  # over max_bytes: x goes
    assert small.get("x") is None and small.get("y") is not None and small.evicted == 1
    table.set("ttl", b"v", 10)
    now[0] = 11
    assert table.sweep() == 1 and table.get("ttl") is None


# --- Redis: passwords, TLS, Sentinel, Cluster refunds ----------------------------------------------

PASSWORD = "hunter2-Sx7q"


def redis_store(**settings):
    from gateway.store.redis import RedisStore

    return RedisStore(StoreSettings(backend="redis", **{"timeout": 2.0, **settings}))


async def refused(store, password: str) -> str:
    """The StoreUnavailable message of a failing operation, checked to hold no password."""
    with pytest.raises(StoreUnavailable) as caught:
        await store.set("k", b"v", None)
    await store.close()
    assert password not in str(caught.value)
    return str(caught.value)


async def test_redis_passwords_in_the_url_or_from_the_environment(redis_server, monkeypatch):
    server = redis_server("--user", "alice", "on", ">alice-pw-9c2", "~*", "&*", "+@all", password=PASSWORD)
    address = f"127.0.0.1:{server.port}/0"
    for url in (f"redis://:{PASSWORD}@{address}", f"redis://alice:alice-pw-9c2@{address}"):
        store = redis_store(url=url)
        await store.set("k", url.encode(), None)
        assert await store.get("k") == url.encode()
        await store.close()
    monkeypatch.setenv("PLUGWAY_TEST_REDIS_PASSWORD", PASSWORD)
    store = redis_store(url=server.url, password_env="PLUGWAY_TEST_REDIS_PASSWORD")
    assert await store.incr("n") == 1
    await store.close()

    assert "Authentication required" in await refused(redis_store(url=server.url), PASSWORD)
    assert "AuthenticationError" in await refused(redis_store(url=f"redis://:wrong-{PASSWORD}@{address}"), PASSWORD)
    assert "AuthenticationError" in await refused(redis_store(url=f"redis://alice:{PASSWORD}@{address}"), PASSWORD)
    monkeypatch.setenv("PLUGWAY_TEST_REDIS_PASSWORD", "wrong-" + PASSWORD)
    await refused(redis_store(url=server.url, password_env="PLUGWAY_TEST_REDIS_PASSWORD"), PASSWORD)
    assert server.cli("get", "plugway:k") == f"redis://alice:alice-pw-9c2@{address}"


def test_a_password_in_the_store_url_is_never_printed(tmp_path):
    from gateway import config
    from gateway.testing import PLUGWAY

    path = tmp_path / "plugway.toml"
    path.write_text(f'[store]\nbackend = "redis"\nurl = "redis://alice:{PASSWORD}@127.0.0.1:6379/0"\n')
    shown = subprocess.run([PLUGWAY, "config", "show", "-c", str(path)], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert PASSWORD not in shown.stdout + shown.stderr
    assert 'url = "redis://alice:***@127.0.0.1:6379/0"' in shown.stdout
    settings = config.load(path)
    assert settings.store.password == PASSWORD  # kept, for the client
    assert PASSWORD not in repr(settings) and "alice:***@" in repr(settings.store)

    bad = {  # each a configuration error, shown with the password masked
        f'url = "redis://:{PASSWORD}@127.0.0.1:port/0"': "'redis://:***@127.0.0.1:port/0' has an invalid port",
        f'url = "http://u:{PASSWORD}@127.0.0.1:6379/0"': "'http://u:***@127.0.0.1:6379/0' must start with redis://",
        f'url = "redis://:{PASSWORD}@h:6379/0"\npassword_env = "P"': "store.password_env: the url holds a password",
        f'url = "unix:///run/redis.sock?password={PASSWORD}"': "'unix:///run/redis.sock?password=***' must start",
    }
    for line, expected in bad.items():
        path.write_text(f'[store]\nbackend = "redis"\n{line}\n')
        checked = subprocess.run([PLUGWAY, "check", "-c", str(path)], capture_output=True, text=True, timeout=60)
        assert checked.returncode != 0 and expected in checked.stderr, (line, checked.stderr)
        assert PASSWORD not in checked.stdout + checked.stderr, checked.stderr


async def test_rediss_verifies_the_server_against_tls_ca_file(redis_server, tmp_path):
    from gateway import config
    from gateway.config import ConfigErrors
    from gateway.testing import CertificateAuthority, RedisStartError

    authority = CertificateAuthority(tmp_path / "ca")
    try:
        server = redis_server(authority=authority, password=PASSWORD)
    except RedisStartError as exc:
        pytest.skip(f"this redis-server cannot serve TLS: {exc}")
    assert server.url.startswith("rediss://")
    url = server.url.replace("rediss://", f"rediss://:{PASSWORD}@")
    store = redis_store(url=url, tls_ca_file=authority.ca_file)
    await store.set("k", b"over TLS", None)
    assert await store.get("k") == b"over TLS"
    assert [r.allowed for r in await store.take([Limit("rl:{tls}", "token_bucket", 1, 60)])] == [True]
    await store.close()
    assert server.cli("get", "plugway:k") == "over TLS"

    # the system's CAs do not know the test CA; plain redis:// gets no answer from a TLS port
    assert "certificate verify failed" in await refused(redis_store(url=url), PASSWORD)
    await refused(redis_store(url=url.replace("rediss://", "redis://"), timeout=0.5), PASSWORD)
    other = CertificateAuthority(tmp_path / "other-ca")
    assert "certificate verify failed" in await refused(redis_store(url=url, tls_ca_file=other.ca_file), PASSWORD)

    for store_table, problem in ((f'url = "redis://127.0.0.1:1/0"\ntls_ca_file = "{authority.ca_file}"', "rediss://"),
                                 (f'url = "{server.url}"\ntls_ca_file = "{tmp_path}/none.pem"', "not a readable file")):
        with pytest.raises(ConfigErrors, match=problem):
            config.loads(f'[store]\nbackend = "redis"\n{store_table}\n')


async def test_sentinel_finds_the_master(redis_server, redis_sentinel, monkeypatch):
    master = redis_server(password=PASSWORD)
    sentinel = redis_sentinel(master, "plugway-master")
    monkeypatch.setenv("PLUGWAY_TEST_REDIS_PASSWORD", PASSWORD)
    settings = dict(sentinels=(sentinel.address,), password_env="PLUGWAY_TEST_REDIS_PASSWORD")
    store = redis_store(sentinel_master="plugway-master", **settings)
    await store.set("k", b"via sentinel", None)
    assert await store.get("k") == b"via sentinel"
    assert await store.incr("n", 3) == 3
    limit = Limit("rl:{s}", "sliding_window", 2, 3600)
    assert [(await store.take([limit]))[0].allowed for _ in range(3)] == [True, True, False]
    await store.close()
    assert master.cli("get", "plugway:k") == "via sentinel"  # the master the sentinel named
    assert "MasterNotFoundError" in await refused(redis_store(sentinel_master="nobody", **settings), PASSWORD)


def keys_on_two_nodes(store) -> tuple[str, str]:
    """Two rate-limit keys whose slots belong to different nodes of the cluster."""
    first = "rl:{a}"
    owner = store.client.get_node_from_key(store.prefix + first).name
    for tag in "bcdefghijklmnopqrstuvwxyz":
        if store.client.get_node_from_key(store.prefix + f"rl:{{{tag}}}").name != owner:
            return first, f"rl:{{{tag}}}"
    raise AssertionError("every key landed on one node")


@pytest.mark.parametrize("algorithm", ["token_bucket", "sliding_window"])
async def test_a_cluster_refunds_the_first_limit_when_the_second_refuses(redis_cluster, algorithm):
    nodes = redis_cluster(3)
    store = redis_store(url=nodes[0].url, cluster=True)
    await store.connect()
    first_key, second_key = keys_on_two_nodes(store)
    first = Limit(first_key, algorithm, 10, 3600)
    second = Limit(second_key, "token_bucket", 1, 3600)
    assert [r.allowed for r in await store.take([first, second])] == [True, True]
    refused_by_second = await store.take([first, second])
    assert [r.allowed for r in refused_by_second] == [True, False]  # the first was taken, then given back
    (after,) = await store.take([first])
    assert after.remaining == 8  # 10 - the first request - this one: the refused request left no trace
    state = await store.client.hgetall(store.prefix + first_key)
    if algorithm == "token_bucket":
        assert float(state[b"t"]) == pytest.approx(8, abs=0.1)  # tokens left (10/h refills slowly)
    else:
        assert int(state[b"c"]) == 2  # requests counted in this window
    await store.close()


async def test_a_sliding_window_refund_goes_back_to_the_window_it_was_counted_in(redis_server):
    server = redis_server()
    store = redis_store(url=server.url)

    async def state(key: str) -> dict[str, int]:
        return {k.decode(): int(float(v)) for k, v in (await store.client.hgetall(store.prefix + key)).items()}

    hourly = Limit("rl:{hourly}", "sliding_window", 10, 3600)
    ((_, window),) = await store._take_rows([hourly])
    assert (await state(hourly.key))["c"] == 1
    await store._refund_one(hourly, window)  # still the same window: its count goes down
    assert (await state(hourly.key))["c"] == 0

    per_second = Limit("rl:{second}", "sliding_window", 10, 1)
    ((_, window),) = await store._take_rows([per_second])
    assert (await state(per_second.key))["w"] == int(window)
    while int((await store.client.time())[0]) <= int(window):  # Redis's clock, as the script's
        await asyncio.sleep(0.01)
    (other,) = await store.take([per_second])  # another request rolls the window first
    assert other.allowed
    await store._refund_one(per_second, window)
    after = await state(per_second.key)
    assert after["w"] > int(window)
    # The other request's count stays. Ours went into the previous window (or out of both,
    # if the next request came more than a window later): that is where it is given back.
    assert after["c"] == 1 and after["p"] == 0, after
    await store.close()


# --- the local store process under a real supervisor -----------------------------------------------


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as stat:
                    fields = stat.read().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(entry.name))
    return found


async def test_the_supervisor_restarts_a_killed_store_process(plugway_process, aiohttp_raw_server):
    from aiohttp import ClientSession, web

    from support import async_wait_until, route_config

    async def ok(request):
        return web.Response(text="ok")

    upstream = await aiohttp_raw_server(ok)
    # the rate limit goes through the store on every request; fail_open lets requests through while it is away
    plugins = ('[store]\ntimeout = "2s"\n[plugins.sample]\n[plugins.ratelimit]\non_store_error = "fail_open"\n'
               '[[plugins.ratelimit.limits]]\nkey = "global"\nrate = "1000000/m"\n')
    gateway = plugway_process(route_config(str(upstream.make_url("")).rstrip("/"), server="workers = 2",
                                           extra=plugins))
    workers = {worker["pid"] for worker in gateway.wait_for_workers(2)}

    def store_processes() -> set[int]:
        return children_of(gateway.process.pid) - {worker["pid"] for worker in gateway.status()["workers"]}

    (store_pid,) = store_processes()
    assert gateway.logged(f"store process {store_pid} listening")

    answers: list[tuple[str, int, bool]] = []  # (phase the request started in, status, counted by the store)
    phase = "before"
    stop = asyncio.Event()

    async def load(session: ClientSession) -> None:
        while not stop.is_set():
            started_in = phase
            async with session.get(gateway.url + "/api/x") as response:
                answers.append((started_in, response.status, "RateLimit" in response.headers))

    async with ClientSession() as session:
        async def counter() -> int:
            async with session.post(f"http://127.0.0.1:{gateway.admin_port}/sample/counter") as response:
                assert response.status == 200
                return (await response.json())["calls"]

        assert [await counter(), await counter()] == [1, 2]
        clients = [asyncio.create_task(load(session)) for _ in range(4)]
        await async_wait_until(lambda: len(answers) >= 20)
        phase = "restarting"
        os.kill(store_pid, signal.SIGKILL)
        await async_wait_until(lambda: store_processes() - {store_pid} and gateway.logged("the store process died"))
        (new_pid,) = store_processes()
        await async_wait_until(lambda: gateway.logged(f"store process {new_pid} listening"))
        phase = "after"
        # rate limits go through the new store process: requests are counted again
        await async_wait_until(lambda: sum(begun == "after" and counted for begun, _, counted in answers) >= 20)
        stop.set()
        await asyncio.gather(*clients)
        assert await counter() == 1  # the new store process serves, empty as documented
    assert {status for _, status, _ in answers} == {200}, answers  # never a 500 while the store was away
    assert any(counted for started_in, _, counted in answers if started_in == "before")
    assert {worker["pid"] for worker in gateway.wait_for_workers(2)} == workers  # the workers were not restarted
