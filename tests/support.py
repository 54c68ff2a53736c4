"""Helpers the core tests import: real upstream servers, raw clients, configurations.

A module of its own rather than conftest.py, whose name every plugin's tests share:
``from conftest import`` would pick up whichever conftest was imported first.

Nothing here mocks the network: upstreams are real servers on loopback,
clients use real sockets, and process tests run the real ``plugway`` command.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import httptools

from gateway.testing import PLUGWAY, CertificateAuthority, free_port, proxy_config, wait_until

__all__ = [  # PLUGWAY, CertificateAuthority, free_port and wait_until too: the core tests import them from here
    "PLUGWAY", "ROOT", "CertificateAuthority", "RawUpstream", "TlsRawUpstream", "async_wait_until",
    "async_wait_until_quiet", "free_port", "http_response", "open_small_buffered", "raw_exchange", "read_responses",
    "route_config", "wait_until",
]

ROOT = Path(__file__).resolve().parent.parent


async def async_wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


def route_config(upstream_url: str, *, route: str = "", upstream: str = "", extra: str = "", server: str = "") -> str:
    """``proxy_config`` with ``strip_prefix`` on the route "api"; ``extra`` (more routes, then plugins) follows it."""
    route = f"strip_prefix = true\n{textwrap.dedent(route)}"
    return proxy_config(upstream_url, server=server, upstream=upstream, route=route, routes=extra)


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


async def async_wait_until_quiet(probe: Callable[[], object], quiet: float = 0.5, timeout: float = 60.0) -> None:
    """Wait until ``probe()`` has returned the same value for ``quiet`` seconds: the thing watched stopped moving."""
    deadline = time.monotonic() + timeout
    value, since = probe(), time.monotonic()
    while time.monotonic() - since < quiet:
        if time.monotonic() > deadline:
            raise AssertionError(f"still changing after {timeout}s: {value!r}")
        await asyncio.sleep(0.05)
        if (latest := probe()) != value:
            value, since = latest, time.monotonic()


class _Responses:
    """httptools callbacks: the (status, body) of every response on a connection, in order."""

    def __init__(self) -> None:
        self.done: list[tuple[int, bytes]] = []
        self._body: list[bytes] = []
        self.parser = httptools.HttpResponseParser(self)

    def on_body(self, data: bytes) -> None:
        self._body.append(data)

    def on_message_complete(self) -> None:
        self.done.append((self.parser.get_status_code(), b"".join(self._body)))
        self._body = []


async def read_responses(
    reader: asyncio.StreamReader, count: int, *, read_timeout: float = 10.0,
) -> list[tuple[int, bytes]]:
    """Read ``count`` whole responses from one connection: their (status, body), in order.

    Fails if the connection closes first or stays silent for ``read_timeout``."""
    responses = _Responses()
    while len(responses.done) < count:
        chunk = await asyncio.wait_for(reader.read(1 << 20), read_timeout)
        if not chunk:
            raise AssertionError(f"the connection closed after {len(responses.done)} of {count} responses")
        responses.parser.feed_data(chunk)
    return responses.done


async def open_small_buffered(port: int, size: int = 65536) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client connection whose kernel send and receive buffers are fixed at ``size`` (no autotuning),
    so that what the gateway does not read stays with the client, where the test can see it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


class TlsRawUpstream(RawUpstream):
    """A ``RawUpstream`` behind TLS with the certificate ``cert``/``key``, reached as ``https://localhost:PORT``.

    ``server_names`` records the SNI name of every handshake (None when the client sent none).
    """

    def __init__(self, respond: Callable[[bytes], bytes | None], cert: str, key: str) -> None:
        super().__init__(respond)
        self.server_names: list[str | None] = []
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.context.sni_callback = lambda ssl_object, name, context: self.server_names.append(name)
        self.also: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    async def start(self) -> TlsRawUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context)
        self.port = self.server.sockets[0].getsockname()[1]
        try:  # where "localhost" resolves to ::1 first
            self.also = await asyncio.start_server(self._serve, "::1", self.port, ssl=self.context)
        except OSError:
            pass
        return self

    async def close(self) -> None:
        if self.also is not None:
            self.also.close()
            await self.also.wait_closed()
        await super().close()
