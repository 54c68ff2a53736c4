"""pytest fixtures for plugin authors: a real gateway, in the test's event loop, on real sockets.

Installed with Plugway as a pytest plugin (entry point ``pytest11``), so a
plugin's test suite only needs ``pytest-aiohttp``::

    from aiohttp import web
    from gateway.testing import proxy_config

    async def hello(request):
        return web.Response(text="hi")

    async def test_adds_header(plugway_gateway, aiohttp_raw_server):
        upstream = await aiohttp_raw_server(hello)
        gateway = await plugway_gateway(proxy_config(upstream.make_url(""), plugins='''
            [plugins.myplugin]
            greeting = "hello"
        '''), plugins={"myplugin": myplugin})
        async with gateway.client.get("/api/x") as response:
            assert response.headers["X-Greeting"] == "hello"

``proxy_config`` writes the configuration most tests need around the test's own
tables: the upstream "app" (here the test's server) and the route "api" on /api
to it; ``route_table`` adds more routes. ``plugins`` registers plugin modules
under a name without installing them; installed plugins are found by entry
point as in production. Everything started is stopped at the end of the test.

``plugway_process`` runs the real ``plugway run`` (supervisor and workers)
instead, for tests of what only a cluster shows; ``redis_server`` and
``redis_cluster`` start real ``redis-server`` processes on free ports.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tomli_w

from . import config
from .context import Consumer
from .hookspecs import hookimpl
from .plugins import PluginDeclaration, load_plugins
from .sockets import bind_listener
from .worker import Gateway, Worker

PLUGWAY = str(Path(sys.executable).with_name("plugway"))


class RunningGateway:
    """A gateway started by ``plugway_gateway``: where it listens and how to talk to it."""

    def __init__(self, worker: Worker, task: asyncio.Task, port: int, admin_port: int, scheme: str) -> None:
        self.worker = worker
        self.task = task
        self.port = port
        self.admin_port = admin_port
        self.url = f"{scheme}://127.0.0.1:{port}"
        self.admin_url = f"http://127.0.0.1:{admin_port}"
        # TLS listeners in tests use certificates the test made: the client does not verify them.
        self.client = aiohttp.ClientSession(
            base_url=self.url, auto_decompress=False, connector=aiohttp.TCPConnector(ssl=False),
        )

    @property
    def gateway(self) -> Gateway:
        return self.worker.gateway

    def metric(self, name: str, **labels: str) -> float:
        """The current value of one metric sample (0.0 if it was never set), for assertions."""
        self.gateway.metrics.flush()
        value = self.gateway.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    async def stop(self) -> None:
        await self.client.close()
        self.worker.stop()
        await self.task


async def start_gateway(config_text: str, plugins: dict[str, Any] | None = None) -> RunningGateway:
    settings = config.loads(textwrap.dedent(config_text))
    plugin_set = load_plugins(settings, extra=plugins)
    listener = bind_listener("127.0.0.1:0", backlog=128, reuse_port=False)
    admin = bind_listener("127.0.0.1:0", backlog=128, reuse_port=False)
    ready = asyncio.get_running_loop().create_future()
    first = settings.server.listeners[0]  # its TLS and redirect settings apply to the test socket
    worker = Worker(
        settings, [(listener, first)], admin, plugins=plugin_set, handle_signals=False,
        on_ready=lambda gateway: ready.set_result(None),
    )
    task = asyncio.create_task(worker.serve())
    await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # start-up failed: raise its error here
    return RunningGateway(worker, task, listener.getsockname()[1], admin.getsockname()[1], first.scheme)


class HeaderIdentity:
    """A stand-in for an auth plugin in tests: the consumer comes from request headers.

    ``X-Test-User`` (the id), ``X-Test-Roles`` (comma-separated), ``X-Test-Scopes``
    (space-separated) and ``X-Test-Claims`` (JSON); ``X-Test-Anonymous`` instead makes the
    anonymous consumer an auth plugin lets in without credentials. Register it as a plugin:
    ``plugway_gateway(config, plugins={"identity": HeaderIdentity()})`` with an
    ``[plugins.identity]`` table. Never use it outside tests.
    """

    @hookimpl
    def declare_plugin(self):
        return PluginDeclaration(priority=1000)

    @hookimpl
    def on_request(self, ctx):
        headers = ctx.request.headers
        user = headers.get("X-Test-User")
        if "X-Test-Anonymous" in headers:
            ctx.consumer = Consumer("anonymous", roles=("anonymous",), anonymous=True)
        elif user is not None:
            ctx.consumer = Consumer(
                user,
                roles=tuple(filter(None, headers.get("X-Test-Roles", "").split(","))),
                scopes=tuple(headers.get("X-Test-Scopes", "").split()),
                claims=json.loads(headers.get("X-Test-Claims", "{}")),
            )


def proxy_config(upstream_url: str, *, server: str = "", upstream: str = "", route: str = "", routes: str = "",
                 plugins: str = "") -> str:
    """The configuration most gateway tests start from, as TOML text: the upstream "app" with
    the one target ``upstream_url``, the route "api" on the prefix /api to it, no access log.

    Each keyword is TOML text (its indentation does not matter) put where it belongs: ``server``,
    keys of [server]; ``upstream``, more keys of "app"; ``route``, keys and sub-tables of "api",
    such as ``[routes.plugins.NAME]``; ``routes``, more [[routes]] (see ``route_table``) and
    [[upstreams]] tables; ``plugins``, the [plugins.NAME] tables and any other top-level table,
    last. For example, "myplugin" on /api but off on /open::

        proxy_config(url, routes=route_table("open", myplugin="enabled = false"),
                     plugins="[plugins.myplugin]\\ngreeting = 'hello'")
    """
    return _toml_lines(
        "[server]", server,
        "[log]", "access = false",
        "[[upstreams]]", 'name = "app"', f'targets = [{{ url = "{upstream_url}" }}]', upstream,
        "[[routes]]", 'name = "api"', 'prefix = "/api"', 'upstream = "app"', route,
        routes, plugins,
    )


def route_table(name: str, prefix: str | None = None, *, upstream: str = "app", **plugins: str) -> str:
    """One more [[routes]] table, for ``proxy_config(routes=...)``: ``name`` on ``prefix`` (by
    default "/" + name) to ``upstream``. Each keyword NAME="keys" adds [routes.plugins.NAME] with
    those keys: ``route_table("open", auth="enabled = false")`` is a route with auth off."""
    tables = (part for plugin, settings in plugins.items() for part in (f"[routes.plugins.{plugin}]", settings))
    return _toml_lines("[[routes]]", f'name = "{name}"', f'prefix = "{prefix or "/" + name}"',
                       f'upstream = "{upstream}"', *tables)


def _toml_lines(*parts: str) -> str:
    """The parts, each dedented, one after another (empty ones left out)."""
    texts = (textwrap.dedent(part).strip() for part in parts)
    return "".join(text + "\n" for text in texts if text)


def free_port() -> int:
    """A loopback port nobody listens on (free now: another process may take it later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], bool], timeout: float = 15.0, interval: float = 0.02) -> None:
    """Poll ``condition`` until it holds; fail the test if it never does (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {condition}")
        time.sleep(interval)


class PlugwayProcess:
    """``plugway run`` as a real process, with its stdout (the access log) captured to a file."""

    def __init__(self, tmp_path: Path, config_text: str, *, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        self.runtime_dir = tmp_path / "run"
        self.config_path = tmp_path / "plugway.toml"
        self.stdout_path = tmp_path / "stdout.log"
        self.stderr_path = tmp_path / "stderr.log"
        self.write_config(config_text)
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self, config_text: str) -> None:
        """Write the configuration with this process's ports and runtime directory filled in."""
        table = tomllib.loads(config_text)
        server = table.setdefault("server", {})
        server.setdefault("listen", [f"127.0.0.1:{self.port}"])
        for listener in server["listen"]:
            if isinstance(listener, dict) and listener.get("address", "127.0.0.1:0") == "127.0.0.1:0":
                listener["address"] = f"127.0.0.1:{self.port}"  # "127.0.0.1:0" (or none): this process's port
        server["runtime_dir"] = str(self.runtime_dir)
        table.setdefault("admin", {}).setdefault("listen", f"127.0.0.1:{self.admin_port}")
        self.config_path.write_text(tomli_w.dumps(table))

    def status(self) -> dict:
        try:
            return json.loads((self.runtime_dir / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def ready_workers(self) -> list[dict]:
        return [w for w in self.status().get("workers", []) if w["state"] == "ready"]

    def wait_for_workers(self, count: int, generation: int | None = None, timeout: float = 30) -> list[dict]:
        def settled():
            workers = self.ready_workers()
            status = self.status()
            return (len(workers) == count and len(status.get("workers", [])) == count
                    and (generation is None or all(w["generation"] == generation for w in workers)))
        wait_until(settled, timeout=timeout)
        return self.ready_workers()

    def logged(self, text: str) -> bool:
        """Whether the gateway's own (JSON) log has a message containing ``text``."""
        for line in self.stderr_path.read_text().splitlines():
            try:
                if text in json.loads(line).get("message", ""):
                    return True
            except ValueError:
                continue
        return False

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([PLUGWAY, *args, "-c", str(self.config_path)], capture_output=True, text=True,
                              timeout=120, env=self.env)

    def start(self, *args: str) -> PlugwayProcess:
        for attempt in range(3):
            self.process = subprocess.Popen(
                [PLUGWAY, *args, "-c", str(self.config_path)] if args else [PLUGWAY, "run", "-c", str(self.config_path)],
                stdout=self.stdout_path.open("wb"), stderr=self.stderr_path.open("wb"), env=self.env,
            )
            wait_until(lambda: self.status().get("ready") or self.process.poll() is not None, timeout=30)
            if self.process.poll() is None:
                return self
            if "Address already in use" not in self.stderr_path.read_text() or attempt == 2:
                raise AssertionError(f"plugway exited early: {self.stderr_path.read_text()}")
            self._new_ports()  # another test took a port between free_port() and bind
        return self

    def _new_ports(self) -> None:
        old = (self.port, self.admin_port)
        self.port, self.admin_port = free_port(), free_port()
        text = self.config_path.read_text()
        for before, after in zip(old, (self.port, self.admin_port)):
            text = text.replace(f"127.0.0.1:{before}", f"127.0.0.1:{after}")
        self.config_path.write_text(text)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 30) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def access_log(self) -> list[dict]:
        return [json.loads(line) for line in self.stdout_path.read_text().splitlines() if line.startswith("{")]


@pytest.fixture
def plugway_process(tmp_path):
    """Factory: ``plugway_process(toml_text, env={...})`` -> a started ``PlugwayProcess``.

    Ports, the admin address and the runtime directory are filled in; each call gets
    its own directory, so several gateways (two hosts sharing a Redis) can run at once.
    """
    started: list[PlugwayProcess] = []

    def start(config_text: str, *args: str, env: dict[str, str] | None = None) -> PlugwayProcess:
        directory = tmp_path / f"gateway-{len(started)}"
        directory.mkdir()
        process = PlugwayProcess(directory, config_text, env=env).start(*args)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
async def plugway_gateway() -> AsyncIterator[Callable[..., Awaitable[RunningGateway]]]:
    """Factory: ``await plugway_gateway(toml_text, plugins={name: module})`` -> ``RunningGateway``."""
    started: list[RunningGateway] = []

    async def start(config_text: str, plugins: dict[str, Any] | None = None) -> RunningGateway:
        running = await start_gateway(config_text, plugins)
        started.append(running)
        return running

    yield start
    for running in reversed(started):
        await running.stop()


# --- real Redis for store tests --------------------------------------------------------------------


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        candidate = random.randint(20000, 29999)
        with socket.socket() as first, socket.socket() as second:
            try:
                first.bind(("127.0.0.1", candidate))
                second.bind(("127.0.0.1", candidate + 10000))
            except OSError:
                continue
            return candidate
    raise RuntimeError("no free port pair for a Redis Cluster node")


class CertificateAuthority:
    """A throwaway CA (cryptography) that signs server certificates into files, for tests of
    TLS listeners, https upstreams and Redis over TLS. ``ca_file`` is its certificate."""

    def __init__(self, directory: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Plugway Test CA")])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.ca_file = str(directory / "ca.pem")
        Path(self.ca_file).write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, *hosts: str, days: int = 30, start_days_ago: int = 1,
              key: Any = None) -> tuple[str, str, int]:
        """(certificate file, key file, serial) for ``hosts`` (DNS names or IP addresses;
        default localhost and 127.0.0.1), valid from ``start_days_ago`` for ``days``."""
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        def alternative(host: str) -> x509.GeneralName:
            try:
                return x509.IPAddress(ipaddress.ip_address(host))
            except ValueError:
                return x509.DNSName(host)

        hosts = hosts or ("localhost", "127.0.0.1")
        key = key or ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        serial = x509.random_serial_number()
        cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
                .issuer_name(self.cert.subject).public_key(key.public_key()).serial_number(serial)
                .not_valid_before(now - datetime.timedelta(days=start_days_ago))
                .not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.SubjectAlternativeName([alternative(host) for host in hosts]), critical=False)
                .sign(self.key, hashes.SHA256()))
        cert_file, key_file = self.directory / f"{name}.pem", self.directory / f"{name}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return str(cert_file), str(key_file), serial

    def client_context(self, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        """A client context that trusts this CA (and only it)."""
        context = ssl.create_default_context(cafile=self.ca_file)
        if maximum is not None:
            context.maximum_version = maximum
        return context


class RedisStartError(RuntimeError):
    """redis-server exited instead of serving; the message holds the end of its log."""


class RedisServer:
    """A ``redis-server`` on a free loopback port, nothing saved to disk.

    ``password`` adds ``--requirepass``; ``authority`` (a ``CertificateAuthority``) makes it
    serve TLS only, with a certificate for 127.0.0.1 and localhost (clients are not asked for
    one). Other ``args`` go to redis-server as they are. Its log is ``directory/redis.log``.
    """

    def __init__(self, directory: Path, *args: str, password: str | None = None,
                 authority: CertificateAuthority | None = None) -> None:
        self.port = _free_cluster_port() if "--cluster-enabled" in args else free_port()
        self.directory = directory
        self.args = args
        self.password = password
        self.authority = authority
        self.log_path = directory / "redis.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The URL without the password (``redis://:PASSWORD@...`` adds it)."""
        return f"{'rediss' if self.authority else 'redis'}://127.0.0.1:{self.port}/0"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        options = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.directory)]
        if self.password is not None:
            options += ["--requirepass", self.password]
        if self.authority is None:
            return ["redis-server", "--port", str(self.port), *options, *self.args]
        cert, key, _ = self.authority.issue(f"redis-{self.port}")
        return ["redis-server", "--port", "0", "--tls-port", str(self.port), "--tls-cert-file", cert,
                "--tls-key-file", key, "--tls-ca-cert-file", self.authority.ca_file, "--tls-auth-clients", "no",
                *options, *self.args]

    def start(self) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: self.answers() or self.process.poll() is not None, timeout=15)
        if self.process.poll() is not None:
            raise RedisStartError(f"redis-server exited ({self.process.returncode}): {self.log()[-2000:]}")
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def cli(self, *args: str) -> str:
        options = ["-p", str(self.port)]
        if self.password is not None:
            options += ["-a", self.password, "--no-auth-warning"]
        if self.authority is not None:
            options += ["--tls", "--cacert", self.authority.ca_file]
        result = subprocess.run(["redis-cli", *options, *args], capture_output=True, text=True, timeout=30)
        return result.stdout.strip()

    def answers(self) -> bool:
        """Whether it answers PING (a server asking for a password answers too)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw:
                sock = raw
                if self.authority is not None:
                    sock = self.authority.client_context().wrap_socket(raw, server_hostname="127.0.0.1")
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class RedisSentinel(RedisServer):
    """A Sentinel (``redis-server --sentinel``) monitoring ``master`` under ``name``, quorum 1."""

    def __init__(self, directory: Path, master: RedisServer, name: str = "mymaster") -> None:
        super().__init__(directory)
        self.master = master
        self.name = name

    def command(self) -> list[str]:
        self.directory.mkdir(parents=True, exist_ok=True)
        lines = [f"sentinel monitor {self.name} 127.0.0.1 {self.master.port} 1"]
        if self.master.password is not None:
            lines.append(f"sentinel auth-pass {self.name} {self.master.password}")
        config_file = self.directory / "sentinel.conf"  # Sentinel rewrites it: it must be its own
        config_file.write_text("\n".join(lines) + "\n")
        return ["redis-server", str(config_file), "--sentinel", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.directory)]

    def master_address(self) -> str:
        """What this sentinel answers for its master: "host:port" ("" before it knows)."""
        return ":".join(self.cli("sentinel", "get-master-addr-by-name", self.name).split())


@pytest.fixture
def redis_server(tmp_path):
    """Factory: ``redis_server(*args, password=None, authority=None)`` -> a started ``RedisServer``
    (stopped after the test); ``args`` are more redis-server options, such as "--maxmemory", "1mb"."""
    started: list[RedisServer] = []

    def start(*args: str, password: str | None = None, authority: CertificateAuthority | None = None) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(started)}", *args, password=password, authority=authority)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def redis_sentinel(tmp_path):
    """Factory: ``redis_sentinel(master, name="mymaster")`` -> a started ``RedisSentinel`` that
    already knows its master (stopped after the test)."""
    started: list[RedisSentinel] = []

    def start(master: RedisServer, name: str = "mymaster") -> RedisSentinel:
        sentinel = RedisSentinel(tmp_path / f"sentinel-{len(started)}", master, name)
        started.append(sentinel)
        sentinel.start()
        wait_until(lambda: sentinel.master_address() == master.address, timeout=15)
        return sentinel

    yield start
    for sentinel in started:
        sentinel.stop()


@pytest.fixture
def redis_cluster(redis_server):
    """Factory: ``redis_cluster(nodes=3)`` -> the node servers of a real Redis Cluster (no replicas)."""

    def start(nodes: int = 3) -> list[RedisServer]:
        servers = [redis_server("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                "--cluster-node-timeout", "2000") for _ in range(nodes)]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *[f"127.0.0.1:{s.port}" for s in servers], "--cluster-replicas", "0",
             "--cluster-yes"], capture_output=True, text=True, check=True, timeout=60,
        )
        wait_until(lambda: all("cluster_state:ok" in s.cli("cluster", "info") for s in servers), timeout=30)
        return servers

    return start
