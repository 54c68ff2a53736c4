"""Two minimal proxies that bound what a Python data path can do here: configs p and r of scripts/bench.

usage: python probe_proxy.py PORT UPSTREAM_URL [--workers N] [--server aiohttp|raw]

Both forward GET-style requests (no request body, no streaming, no error handling) to one upstream
over a keep-alive pool of raw asyncio connections whose responses httptools parses:

- ``--server aiohttp``: the client side is aiohttp's low-level ``web.Server`` (no router), the
  probe the core issue describes (config p);
- ``--server raw``: the client side is an ``asyncio.Protocol`` with httptools' request parser,
  nothing of aiohttp at all (config r).

They are measuring instruments, not proxies: they drop everything a gateway must do (hop-by-hop
headers, timeouts, bodies, limits, logs, metrics) and show what is left when all of it is gone.
N > 1 forks N processes that each bind the port with SO_REUSEPORT; SIGTERM to the parent stops them.
"""
import argparse, asyncio, contextlib, socket
from urllib.parse import urlsplit

import httptools

from aiohttp_proxy import run_forked

HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"date", b"server"}


class UpstreamConnection(asyncio.Protocol):
    def __init__(self):
        self.parser = httptools.HttpResponseParser(self)
        self.done = None

    def connection_made(self, transport):
        self.transport = transport

    def exchange(self, data):
        self.headers, self.body = [], []
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.done

    def data_received(self, data):
        self.parser.feed_data(data)

    def on_header(self, name, value):
        if name.lower() not in HOP:
            self.headers.append((name, value))

    def on_body(self, body):
        self.body.append(body)

    def on_message_complete(self):
        self.done.set_result((self.parser.get_status_code(), self.headers, b"".join(self.body)))

    def connection_lost(self, exc):
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("upstream closed"))


class Pool:
    def __init__(self, url):
        parts = urlsplit(url)
        self.host, self.port, self.idle = parts.hostname, parts.port, []

    async def request(self, method, target, headers):
        if self.idle:
            conn = self.idle.pop()
        else:
            _, conn = await asyncio.get_running_loop().create_connection(UpstreamConnection, self.host, self.port)
        head = b"%s %s HTTP/1.1\r\nHost: %s:%d\r\n" % (method, target, self.host.encode(), self.port)
        head += b"".join(b"%s: %s\r\n" % (k, v) for k, v in headers if k.lower() not in HOP and k.lower() != b"host")
        status, out, body = await conn.exchange(head + b"\r\n")
        self.idle.append(conn)
        return status, out, body


def response_bytes(status, headers, body):
    return b"".join((b"HTTP/1.1 %d OK\r\n" % status, *(b"%s: %s\r\n" % h for h in headers),
                     b"Content-Length: %d\r\n\r\n" % len(body), body))


async def serve_aiohttp(sock, pool):
    from aiohttp import web, web_server

    async def handle(request):
        status, out, body = await pool.request(request.method.encode(), request.raw_path.encode(), request.raw_headers)
        return web.Response(status=status, headers=[(k.decode(), v.decode()) for k, v in out], body=body)
    server = web_server.Server(handle, access_log=None)
    await asyncio.get_running_loop().create_server(server, sock=sock)
    await asyncio.Event().wait()


class RawClient(asyncio.Protocol):
    def __init__(self, pool):
        self.pool, self.parser, self.headers = pool, httptools.HttpRequestParser(self), []

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.parser.feed_data(data)

    def on_url(self, url):
        self.url, self.headers = url, []

    def on_header(self, name, value):
        self.headers.append((name, value))

    def on_message_complete(self):
        asyncio.ensure_future(self.answer(self.parser.get_method(), self.url, self.headers))

    async def answer(self, method, url, headers):
        status, out, body = await self.pool.request(method, url, headers)
        self.transport.write(response_bytes(status, out, body))


async def serve_raw(sock, pool):
    await asyncio.get_running_loop().create_server(lambda: RawClient(pool), sock=sock)
    await asyncio.Event().wait()


def serve(port, upstream, kind):
    with contextlib.suppress(ImportError):
        import uvloop; uvloop.install()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(4096)
    asyncio.run((serve_raw if kind == "raw" else serve_aiohttp)(sock, Pool(upstream)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int); ap.add_argument("upstream")
    ap.add_argument("--workers", type=int, default=1); ap.add_argument("--server", choices=("aiohttp", "raw"))
    a = ap.parse_args()
    run_forked(a.workers, serve, a.port, a.upstream, a.server)


if __name__ == "__main__":
    main()
