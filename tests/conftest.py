"""Shared test helpers: real upstream servers, raw clients, and gateway processes.

Nothing here mocks the network: upstreams are real servers on loopback,
clients use real sockets, and process tests run the real ``plugway`` command.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import httptools
import pytest

ROOT = Path(__file__).resolve().parent.parent
PLUGWAY = str(Path(sys.executable).with_name("plugway"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], bool], timeout: float = 15.0, interval: float = 0.02) -> None:
    """Poll ``condition`` until it holds; fail the test if it never does."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {condition}")
        time.sleep(interval)


async def async_wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


def route_config(upstream_url: str, *, route: str = "", upstream: str = "", extra: str = "", server: str = "") -> str:
    """A one-upstream, one-route configuration; ``server``/``route``/``upstream`` add keys to those tables."""
    return textwrap.dedent(f"""
        [server]
        {textwrap.dedent(server).strip()}
        [log]
        access = false
        [[upstreams]]
        name = "app"
        targets = [{{ url = "{upstream_url}" }}]
        {textwrap.dedent(upstream).strip()}
        [[routes]]
        name = "api"
        prefix = "/api"
        upstream = "app"
        strip_prefix = true
        {textwrap.dedent(route).strip()}
        {textwrap.dedent(extra).strip()}
    """)


class RawUpstream:
    """A raw TCP upstream that records every byte received and answers with scripted bytes.

    ``respond(request_bytes) -> bytes | None`` decides the answer per request;
    None closes the connection without answering. ``connections`` counts accepts.
    """

    def __init__(self, respond: Callable[[bytes], bytes | None]) -> None:
        self.respond = respond
        self.received: list[bytes] = []
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> RawUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                self.received.append(request)
                answer = self.respond(request)
                if answer is None:
                    return
                writer.write(answer)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def _read_request(reader: asyncio.StreamReader) -> bytes | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        body = b""
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            body += size_line + chunk
            if size == 0:
                break
        return head + body
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return head + await reader.readexactly(int(line.split(b":")[1]))
    return head


def http_response(status: int = 200, body: bytes = b"ok", headers: list[tuple[str, str]] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} X"] + [f"{k}: {v}" for k, v in (headers or [])]
    if not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in headers or []):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@pytest.fixture
async def raw_upstream():
    started: list[RawUpstream] = []

    async def start(respond: Callable[[bytes], bytes | None]) -> RawUpstream:
        upstream = await RawUpstream(respond).start()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        await upstream.close()


class _ResponseEnd:
    """httptools callbacks: notes when the first complete response (after any 1xx) has arrived."""

    def __init__(self) -> None:
        self.done = False
        self.parser = httptools.HttpResponseParser(self)

    def on_message_complete(self) -> None:
        if self.parser.get_status_code() >= 200:
            self.done = True


async def raw_exchange(port: int, data: bytes, *, read_timeout: float = 5.0) -> bytes:
    """Send raw bytes to the gateway; read until one whole response, the close, or silence."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    chunks = []
    end = _ResponseEnd()
    try:
        while not end.done:
            chunk = await asyncio.wait_for(reader.read(65536), read_timeout)
            if not chunk:
                break
            chunks.append(chunk)
            try:
                end.parser.feed_data(chunk)
            except httptools.HttpParserError:
                pass
    except (asyncio.TimeoutError, ConnectionError):
        pass
    writer.close()
    return b"".join(chunks)


class GatewayProcess:
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
        import tomllib

        import tomli_w

        table = tomllib.loads(config_text)
        server = table.setdefault("server", {})
        server.setdefault("listen", [f"127.0.0.1:{self.port}"])
        server["runtime_dir"] = str(self.runtime_dir)
        table.setdefault("admin", {}).setdefault("listen", f"127.0.0.1:{self.admin_port}")
        self.config_path.write_text(tomli_w.dumps(table))

    def status(self) -> dict:
        import json
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
        import json
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

    def start(self, *args: str) -> GatewayProcess:
        self.process = subprocess.Popen(
            [PLUGWAY, *args, "-c", str(self.config_path)] if args else [PLUGWAY, "run", "-c", str(self.config_path)],
            stdout=self.stdout_path.open("wb"), stderr=self.stderr_path.open("wb"), env=self.env,
        )
        wait_until(lambda: self.status().get("ready") or self.process.poll() is not None, timeout=30)
        if self.process.poll() is not None:
            raise AssertionError(f"plugway exited early: {self.stderr_path.read_text()}")
        return self

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
        import json
        return [json.loads(line) for line in self.stdout_path.read_text().splitlines() if line.startswith("{")]


@pytest.fixture
def gateway_process(tmp_path):
    started: list[GatewayProcess] = []

    def start(config_text: str, *args: str, env: dict[str, str] | None = None) -> GatewayProcess:
        process = GatewayProcess(tmp_path, config_text, env=env).start(*args)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
