"""The data path through a real gateway to real upstream servers."""

import asyncio
import gzip
import json

import aiohttp
import pytest
from aiohttp import web

from gateway.testing import HeaderIdentity
from support import CertificateAuthority, TlsRawUpstream, async_wait_until, free_port, http_response, raw_exchange, route_config


async def echo(request: web.BaseRequest) -> web.StreamResponse:
    body = await request.read()
    payload = {
        "method": request.method,
        "target": request.raw_path,
        "headers": [[k, v] for k, v in request.raw_headers and [(k.decode(), v.decode()) for k, v in request.raw_headers]],
        "body": body.decode("latin-1"),
    }
    return web.json_response(payload)


async def start(plugway_gateway, aiohttp_raw_server, handler=echo, **config):
    upstream = await aiohttp_raw_server(handler)
    return await plugway_gateway(route_config(str(upstream.make_url("")).rstrip("/"), **config))


def with_access_log(config: str) -> str:
    return config.replace("access = false", "access = true")


def access_log(gateway, capfd) -> list[dict]:
    """The access log lines written so far (the gateway writes them to stdout)."""
    gateway.gateway.access_log.flush()
    return [json.loads(line) for line in capfd.readouterr().out.splitlines() if line.startswith("{")]


async def test_the_client_gets_what_the_upstream_answered_plus_the_request_id(plugway_gateway, aiohttp_raw_server):
    async def handler(request):
        response = web.Response(body=b"\x00\x01binary", status=201, reason="Made It", headers={"X-Up": "1"})
        response.headers.add("Set-Cookie", "a=1; Path=/")
        response.headers.add("Set-Cookie", "b=2; Path=/")
        return response

    gateway = await start(plugway_gateway, aiohttp_raw_server, handler)
    async with gateway.client.get("/api/x") as response:
        assert response.status == 201
        assert response.reason == "Made It"
        assert await response.read() == b"\x00\x01binary"
        assert response.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
        assert response.headers["X-Up"] == "1"
        assert len(response.headers["X-Request-ID"]) == 32


async def test_content_encoding_and_redirects_are_passed_untouched(plugway_gateway, aiohttp_raw_server):
    compressed = gzip.compress(b"hello " * 100)

    async def handler(request):
        if request.path == "/redirect":
            return web.Response(status=302, headers={"Location": "/elsewhere"})
        return web.Response(body=compressed, headers={"Content-Encoding": "gzip"})

    gateway = await start(plugway_gateway, aiohttp_raw_server, handler)
    async with gateway.client.get("/api/zipped") as response:
        assert response.headers["Content-Encoding"] == "gzip"
        assert await response.read() == compressed
    async with gateway.client.get("/api/redirect", allow_redirects=False) as response:
        assert response.status == 302
        assert response.headers["Location"] == "/elsewhere"


async def test_query_and_encoded_path_reach_the_upstream_byte_for_byte(plugway_gateway, aiohttp_raw_server):
    gateway = await start(plugway_gateway, aiohttp_raw_server)
    raw = b"GET /api/echo/caf%C3%A9/a%20b?x=1&y=%20z&e=%2F HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = await raw_exchange(gateway.port, raw)
    payload = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert payload["target"] == "/echo/caf%C3%A9/a%20b?x=1&y=%20z&e=%2F"


async def test_paths_are_canonicalised_before_routing_and_forwarding(plugway_gateway, aiohttp_raw_server):
    upstream = await aiohttp_raw_server(echo)
    url = str(upstream.make_url("")).rstrip("/")
    gateway = await plugway_gateway(route_config(url, extra="""
        [[routes]]
        name = "admin"
        prefix = "/admin"
        upstream = "app"
        methods = ["DELETE"]
    """))
    for path in ("/api/../admin", "/api/%2e%2e/admin", "/api/.%2E/admin", "//admin", "/api//../admin"):
        answer = await raw_exchange(gateway.port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 405"), (path, answer[:80])  # reached /admin's rules, not /api
    for path in ("/api/%2fadmin", "/api%2f..%2fadmin", "/api/..;/admin", "/api/%252e%252e/admin", "/../admin"):
        answer = await raw_exchange(gateway.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 400"), (path, answer[:80])
        assert b'"code":"bad_path"' in answer
    answer = await raw_exchange(gateway.port, b"GET /api/a/./b//c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["target"] == "/a/b/c"


async def test_hop_by_hop_headers_are_removed_in_both_directions(plugway_gateway, raw_upstream):
    upstream = await raw_upstream(lambda request: http_response(headers=[
        ("Connection", "X-Secret, keep-alive"), ("X-Secret", "1"), ("Keep-Alive", "timeout=5"),
        ("Proxy-Authenticate", "Basic"), ("Trailer", "X-T"), ("Upgrade", "h2c"), ("X-Kept", "yes"),
    ]))
    gateway = await plugway_gateway(route_config(upstream.url))
    answer = await raw_exchange(gateway.port, (
        b"GET /api/x HTTP/1.1\r\nHost: x\r\nConnection: X-Private, close\r\nX-Private: 1\r\nKeep-Alive: 300\r\n"
        b"TE: trailers\r\nTrailer: X-T\r\nUpgrade: websocket\r\nProxy-Authorization: Basic eA==\r\n"
        b"Proxy-Connection: keep-alive\r\nX-Normal: 1\r\n\r\n"
    ))
    seen = upstream.received[0].lower()
    for name in (b"x-private", b"keep-alive", b"\r\nte:", b"trailer", b"upgrade", b"proxy-authorization",
                 b"proxy-connection"):
        assert name not in seen, name
    assert b"x-normal: 1" in seen
    head = answer.split(b"\r\n\r\n")[0].lower()
    for name in (b"x-secret", b"keep-alive", b"proxy-authenticate", b"trailer", b"upgrade"):
        assert name not in head, name
    assert b"x-kept: yes" in head


async def test_connection_cannot_remove_the_headers_the_gateway_sets(plugway_gateway, raw_upstream):
    upstream = await raw_upstream(lambda request: http_response())
    gateway = await plugway_gateway(route_config(upstream.url))
    await raw_exchange(gateway.port, (
        b"GET /api/x HTTP/1.1\r\nHost: x\r\nConnection: close, X-Forwarded-For, X-Request-ID, Forwarded\r\n\r\n"
    ))
    seen = upstream.received[0].lower()
    assert b"\r\nx-forwarded-for: 127.0.0.1\r\n" in seen
    assert b"\r\nx-request-id: " in seen
    assert b"\r\nforwarded: for=127.0.0.1;proto=http" in seen


async def test_forwarding_headers_from_an_untrusted_peer_are_replaced(plugway_gateway, raw_upstream):
    upstream = await raw_upstream(lambda request: http_response())
    gateway = await plugway_gateway(route_config(upstream.url))
    await raw_exchange(gateway.port, (
        b"GET /api/x HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\nX-Forwarded-For: 6.6.6.6\r\n"
        b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.com\r\nForwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n"
        b"X-Request-ID: chosen-by-client\r\n\r\n"
    ))
    seen = upstream.received[0].decode().lower()
    assert "6.6.6.6" not in seen and "evil.com" not in seen and "chosen-by-client" not in seen
    assert "x-forwarded-for: 127.0.0.1\r\n" in seen
    assert "x-forwarded-proto: http\r\n" in seen
    assert "x-forwarded-host: api.example.com\r\n" in seen
    assert 'forwarded: for=127.0.0.1;proto=http;host="api.example.com"\r\n' in seen
    assert seen.count("x-forwarded-for") == 1


async def test_forwarding_headers_from_a_trusted_proxy_are_kept_and_extended(plugway_gateway, raw_upstream):
    upstream = await raw_upstream(lambda request: http_response())
    config = route_config(upstream.url, server='trusted_proxies = ["127.0.0.0/8"]')
    gateway = await plugway_gateway(config)
    answer = await raw_exchange(gateway.port, (
        b"GET /api/x HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\nX-Forwarded-For: 203.0.113.9, 127.0.0.5\r\n"
        b"X-Forwarded-Proto: https\r\nForwarded: for=203.0.113.9\r\nX-Request-ID: edge-42\r\n\r\n"
    ))
    seen = upstream.received[0].decode().lower()
    assert "x-forwarded-for: 203.0.113.9, 127.0.0.5, 127.0.0.1\r\n" in seen
    assert "x-forwarded-proto: https\r\n" in seen
    assert "forwarded: for=203.0.113.9, for=127.0.0.1;proto=http" in seen
    assert "x-request-id: edge-42\r\n" in seen
    assert b"X-Request-ID: edge-42" in answer
    ctx_ip_log = gateway.gateway.trusted_proxies.client_address("127.0.0.1", "203.0.113.9, 127.0.0.5")
    assert ctx_ip_log == "203.0.113.9"


async def test_request_id_is_generated_sent_upstream_returned_and_logged(plugway_gateway, raw_upstream, capfd):
    upstream = await raw_upstream(lambda request: http_response())
    gateway = await plugway_gateway(with_access_log(route_config(upstream.url)))
    answer = await raw_exchange(gateway.port, b"GET /api/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    returned = [line for line in answer.split(b"\r\n") if line.lower().startswith(b"x-request-id:")][0].split(b": ")[1]
    assert b"x-request-id: " + returned in upstream.received[0].lower()
    line = access_log(gateway, capfd)[-1]
    assert line["request_id"] == returned.decode()
    assert line["status"] == 200 and line["route"] == "api" and line["method"] == "GET"
    assert set(line) >= {"time", "client_ip", "path", "upstream", "target", "bytes_in", "bytes_out", "duration_ms"}


async def test_the_access_log_names_the_consumer_a_plugin_set(plugway_gateway, raw_upstream, capfd):
    upstream = await raw_upstream(lambda request: http_response())
    config = with_access_log(route_config(upstream.url, extra="[plugins.identity]"))
    gateway = await plugway_gateway(config, plugins={"identity": HeaderIdentity()})
    for headers in ({"X-Test-User": "alice"}, {}, {"X-Test-Anonymous": "1"}):
        async with gateway.client.get("/api/x", headers=headers) as response:
            assert response.status == 200
    lines = access_log(gateway, capfd)
    assert [line.get("consumer") for line in lines] == ["alice", None, "anonymous"]


async def test_head_204_and_304_carry_no_body(plugway_gateway, raw_upstream):
    def respond(request):
        if request.startswith(b"HEAD"):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n"
        status = 204 if b"/empty" in request else 304
        return f"HTTP/1.1 {status} X\r\nETag: \"v1\"\r\n\r\n".encode()

    upstream = await raw_upstream(respond)
    gateway = await plugway_gateway(route_config(upstream.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(b"HEAD /api/x HTTP/1.1\r\nHost: x\r\n\r\nGET /api/empty HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"GET /api/cached HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    responses = answer.split(b"HTTP/1.1 ")[1:]
    assert [r[:3] for r in responses] == [b"200", b"204", b"304"]
    assert b"Content-Length: 12\r\n" in responses[0]
    for response in responses:
        assert response.endswith(b"\r\n\r\n")  # nothing after the head
    assert upstream.connections == 1  # the HEAD answer left the upstream connection usable


async def test_expect_100_continue(plugway_gateway, aiohttp_raw_server):
    gateway = await start(plugway_gateway, aiohttp_raw_server)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(b"PUT /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hello")
    answer = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200")
    payload = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert payload["body"] == "hello"
    assert "expect" not in [name.lower() for name, _ in payload["headers"]]


async def test_chunked_request_bodies_are_reframed(plugway_gateway, raw_upstream):
    upstream = await raw_upstream(lambda request: http_response())
    gateway = await plugway_gateway(route_config(upstream.url))
    answer = await raw_exchange(gateway.port, (
        b"POST /api/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    ))
    assert answer.startswith(b"HTTP/1.1 200")
    seen = upstream.received[0]
    assert seen.lower().count(b"transfer-encoding: chunked") == 1
    head, body = seen.split(b"\r\n\r\n", 1)
    assert b"ext" not in body and body.endswith(b"\r\n0\r\n\r\n")  # re-framed by the gateway
    chunks, rest = [], body
    while True:
        size, rest = rest.split(b"\r\n", 1)
        if int(size, 16) == 0:
            break
        chunks.append(rest[: int(size, 16)])
        rest = rest[int(size, 16) + 2:]
    assert b"".join(chunks) == b"hello world"


async def test_upstream_keep_alive_connections_are_reused(plugway_gateway, raw_upstream):
    upstream = await raw_upstream(lambda request: http_response())
    gateway = await plugway_gateway(route_config(upstream.url))
    for _ in range(20):
        async with gateway.client.get("/api/x") as response:
            assert response.status == 200
    async with gateway.client.post("/api/x", data=b"body") as response:
        assert response.status == 200
    assert len(upstream.received) == 21
    assert upstream.connections == 1


async def test_a_reused_connection_closed_by_the_upstream_is_retried_transparently(plugway_gateway, raw_upstream):
    served = []

    def respond(request):
        served.append(request)
        return http_response() if len(served) % 2 else None  # every second request: close without answering

    upstream = await raw_upstream(respond)
    gateway = await plugway_gateway(route_config(upstream.url))
    statuses = []
    for _ in range(6):
        async with gateway.client.get("/api/x") as response:
            statuses.append(response.status)
    assert statuses == [200] * 6


async def test_load_balancing_follows_weights_through_the_gateway(plugway_gateway, raw_upstream):
    first = await raw_upstream(lambda request: http_response(body=b"a"))
    second = await raw_upstream(lambda request: http_response(body=b"b"))
    config = route_config(first.url).replace(
        f'targets = [{{ url = "{first.url}" }}]',
        f'targets = [{{ url = "{first.url}", weight = 2 }}, {{ url = "{second.url}" }}]',
    )
    gateway = await plugway_gateway(config)
    bodies = []
    for _ in range(30):
        async with gateway.client.get("/api/x") as response:
            bodies.append(await response.read())
    assert bodies.count(b"a") == 20 and bodies.count(b"b") == 10


async def hashing_gateway(plugway_gateway, raw_upstream, hash_on: str):
    """A gateway hashing on ``hash_on`` over three targets, which answer "0", "1" and "2"."""
    upstreams = [await raw_upstream(lambda request, n=n: http_response(body=str(n).encode())) for n in range(3)]
    targets = ", ".join(f'{{ url = "{u.url}" }}' for u in upstreams)
    config = route_config(upstreams[0].url, upstream=f'balance = "hash"\nhash_on = "{hash_on}"').replace(
        f'targets = [{{ url = "{upstreams[0].url}" }}]', f"targets = [{targets}]")
    return await plugway_gateway(config)


async def assert_sticky_and_spread(fetch, keys: list[str]) -> None:
    """Each key keeps its target (``fetch(key)`` answers the same twice in a row, which round robin
    never would); the keys use all three targets."""
    chosen = {}
    for key in [key for key in keys for _ in range(2)]:
        body = await fetch(key)
        assert chosen.setdefault(key, body) == body, key
    assert len(set(chosen.values())) == 3


async def test_hash_balancing_is_sticky_per_header(plugway_gateway, raw_upstream):
    gateway = await hashing_gateway(plugway_gateway, raw_upstream, "header:X-User")

    async def fetch(user):
        async with gateway.client.get("/api/x", headers={"X-User": user}) as response:
            return await response.read()

    await assert_sticky_and_spread(fetch, [f"u{i}" for i in range(30)])


async def test_hash_balancing_is_sticky_per_cookie(plugway_gateway, raw_upstream):
    gateway = await hashing_gateway(plugway_gateway, raw_upstream, "cookie:session")

    async def fetch(session):  # the same other cookies every time: only "session" may count
        cookies = f"theme=dark; session={session}; lang=en"
        async with gateway.client.get("/api/x", headers={"Cookie": cookies}) as response:
            return await response.read()

    await assert_sticky_and_spread(fetch, [f"s{i}" for i in range(30)])


async def test_hash_balancing_is_sticky_per_client_address(plugway_gateway, raw_upstream):
    gateway = await hashing_gateway(plugway_gateway, raw_upstream, "ip")

    async def fetch(address):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port, local_addr=(address, 0))
        writer.write(b"GET /api/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(-1), 10)
        writer.close()
        return answer.split(b"\r\n\r\n", 1)[1]

    await assert_sticky_and_spread(fetch, [f"127.0.0.{i}" for i in range(1, 31)])


async def test_a_client_that_goes_away_is_logged_as_499_and_the_upstream_request_cancelled(
    plugway_gateway, aiohttp_raw_server, capfd,
):
    upstream_cancelled = asyncio.Event()

    async def slow(request):
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            upstream_cancelled.set()
            raise
        return web.Response()

    upstream = await aiohttp_raw_server(slow)
    upstream.runner.server.handler_cancellation = True
    gateway = await plugway_gateway(with_access_log(route_config(str(upstream.make_url("")).rstrip("/"))))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(b"GET /api/slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await async_wait_until(lambda: gateway.gateway.in_flight == 1)
    writer.close()
    await asyncio.wait_for(upstream_cancelled.wait(), 10)
    await async_wait_until(lambda: gateway.gateway.in_flight == 0)
    line = access_log(gateway, capfd)[-1]
    assert line["status"] == 499 and line["error"] == "client_closed_request"


async def test_gateway_errors_are_json_with_the_right_status(plugway_gateway, aiohttp_raw_server):
    gateway = await start(plugway_gateway, aiohttp_raw_server, route='methods = ["GET", "POST"]')
    async with gateway.client.get("/nowhere") as response:
        assert response.status == 404
        error = (await response.json())["error"]
        assert error["code"] == "route_not_found"
        assert error["request_id"] == response.headers["X-Request-ID"]
    async with gateway.client.delete("/api/x") as response:
        assert response.status == 405
        assert response.headers["Allow"] == "GET, HEAD, POST"
        assert (await response.json())["error"]["code"] == "method_not_allowed"


async def test_bodies_over_the_limit_get_413(plugway_gateway, raw_upstream):
    upstream = await raw_upstream(lambda request: http_response())
    gateway = await plugway_gateway(route_config(upstream.url, server='client_max_body = "1KiB"'))
    answer = await raw_exchange(gateway.port, b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n" + b"x" * 2000)
    assert answer.startswith(b"HTTP/1.1 413") and b'"code":"body_too_large"' in answer
    chunk = b"400\r\n" + b"y" * 1024 + b"\r\n"
    answer = await raw_exchange(gateway.port, b"POST /api/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 3 + b"0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413") and b"Connection: close" in answer
    assert upstream.received == [] or all(b"0\r\n\r\n" not in r[-5:] for r in upstream.received)


async def test_headers_and_request_lines_over_the_limit(plugway_gateway, raw_upstream):
    upstream = await raw_upstream(lambda request: http_response())
    gateway = await plugway_gateway(route_config(upstream.url))
    answer = await raw_exchange(gateway.port, b"GET /api/x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431") and b'"code":"headers_too_large"' in answer
    answer = await raw_exchange(gateway.port, b"GET /api/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 414") and b'"code":"uri_too_long"' in answer
    many = b"".join(b"X-H%d: 1\r\n" % i for i in range(200))
    answer = await raw_exchange(gateway.port, b"GET /api/x HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431")
    assert upstream.received == []


async def test_an_upstream_that_refuses_connections_is_a_502(plugway_gateway):
    gateway = await plugway_gateway(route_config(f"http://127.0.0.1:{free_port()}"))
    async with gateway.client.get("/api/x") as response:
        assert response.status == 502
        assert (await response.json())["error"]["code"] == "upstream_unreachable"


INVALID_RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Bad: a\x00b\r\nContent-Length: 0\r\n\r\n",
    b"NOT HTTP AT ALL\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Evil: a\rSet-Cookie: x\r\nContent-Length: 0\r\n\r\n",
    http_response(headers=[("X-Bad", str(i)) for i in range(300)]),  # more headers than allowed
    http_response(headers=[("X-Bad", "b" * 70_000)]),  # a head larger than allowed
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n\r\n",  # a bad chunk size
]


def bad_on(path: bytes, answers) -> object:
    """An upstream's answer function: the next of ``answers`` for requests to ``path``, 200 "ok" otherwise."""
    answers = iter(answers)
    return lambda request: next(answers) if request.split(b" ", 2)[1] == path else http_response()


async def test_an_invalid_upstream_response_is_a_502_and_its_connection_discarded(plugway_gateway, raw_upstream):
    upstream = await raw_upstream(bad_on(b"/bad", INVALID_RESPONSES))
    gateway = await plugway_gateway(route_config(upstream.url))
    for count, answer in enumerate(INVALID_RESPONSES, 1):
        async with gateway.client.get("/api/bad") as response:
            assert response.status == 502, answer[:40]
            assert (await response.json())["error"]["code"] == "upstream_invalid_response"
            assert "X-Bad" not in response.headers and "Set-Cookie" not in response.headers
        async with gateway.client.get("/api/ok") as response:
            assert response.status == 200 and await response.read() == b"ok"
        assert upstream.connections == count + 1, answer[:40]  # a fresh one after each invalid answer
    async with gateway.client.get("/api/ok") as response:
        assert response.status == 200
    assert upstream.connections == len(INVALID_RESPONSES) + 1  # and the good ones are kept


async def test_a_slow_upstream_is_a_504(plugway_gateway, aiohttp_raw_server):
    async def slow(request):
        await asyncio.sleep(5)
        return web.Response()

    gateway = await start(plugway_gateway, aiohttp_raw_server, slow, upstream='read_timeout = "200ms"')
    async with gateway.client.get("/api/x") as response:
        assert response.status == 504
        assert (await response.json())["error"]["code"] == "upstream_timeout"


async def test_upstream_errors_are_counted_by_upstream_and_code(plugway_gateway, aiohttp_raw_server):
    async def slow_but_for_fast(request):
        if request.path != "/fast":
            await asyncio.sleep(5)
        return web.Response(text="fast")

    slow = str((await aiohttp_raw_server(slow_but_for_fast)).make_url("")).rstrip("/")
    gateway = await plugway_gateway(route_config(f"http://127.0.0.1:{free_port()}", extra=f"""
        [[upstreams]]
        name = "slow"
        targets = [{{ url = "{slow}" }}]
        read_timeout = "200ms"
        [[routes]]
        name = "slow"
        prefix = "/slow"
        upstream = "slow"
        strip_prefix = true
    """))

    def errors(upstream, code):
        return gateway.metric("plugway_upstream_errors_total", upstream=upstream, code=code)

    for path, status in (("/api/x", 502), ("/slow/x", 504), ("/slow/fast", 200), ("/api/x", 502)):
        async with gateway.client.get(path) as response:
            assert response.status == status, path
    assert errors("app", "upstream_unreachable") == 2
    assert errors("slow", "upstream_timeout") == 1
    assert errors("app", "upstream_timeout") == errors("slow", "upstream_unreachable") == 0


async def test_an_upstream_timeout_in_the_middle_of_the_body_is_counted_too(plugway_gateway, aiohttp_raw_server):
    async def stalls_after_the_head(request):
        response = web.StreamResponse(headers={"Content-Length": "100"})
        await response.prepare(request)
        await response.write(b"abc")
        await asyncio.sleep(5)
        return response

    gateway = await start(plugway_gateway, aiohttp_raw_server, stalls_after_the_head, upstream='read_timeout = "200ms"')
    answer = await raw_exchange(gateway.port, b"GET /api/x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\nabc")  # then cut
    await async_wait_until(
        lambda: gateway.metric("plugway_upstream_errors_total", upstream="app", code="upstream_timeout") == 1)


async def test_all_connections_busy_is_a_503_after_the_wait(plugway_gateway, aiohttp_raw_server):
    release = asyncio.Event()

    async def held(request):
        await release.wait()
        return web.Response(text="done")

    gateway = await start(plugway_gateway, aiohttp_raw_server, held,
                          upstream='max_connections = 1\nconnect_timeout = "300ms"')
    first = asyncio.create_task(gateway.client.get("/api/first"))
    await async_wait_until(lambda: gateway.gateway.in_flight == 1)
    async with gateway.client.get("/api/second") as response:
        assert response.status == 503
        assert (await response.json())["error"]["code"] == "upstream_busy"
    release.set()
    async with await first as response:
        assert await response.text() == "done"


async def test_streaming_response_without_length_is_chunked_to_the_client(plugway_gateway, aiohttp_raw_server):
    async def stream(request):
        response = web.StreamResponse()
        await response.prepare(request)
        for i in range(5):
            await response.write(b"part%d;" % i)
            await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    gateway = await start(plugway_gateway, aiohttp_raw_server, stream)
    answer = await raw_exchange(gateway.port, b"GET /api/s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, body = answer.split(b"\r\n\r\n", 1)
    assert b"Transfer-Encoding: chunked" in head
    assert body.endswith(b"0\r\n\r\n")
    async with gateway.client.get("/api/s") as response:
        assert await response.read() == b"part0;part1;part2;part3;part4;"


async def test_http_1_0_clients_get_a_close_delimited_stream(plugway_gateway, aiohttp_raw_server):
    async def stream(request):
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"abc")
        await response.write_eof()
        return response

    gateway = await start(plugway_gateway, aiohttp_raw_server, stream)
    answer = await raw_exchange(gateway.port, b"GET /api/s HTTP/1.0\r\nHost: x\r\n\r\n")
    head, body = answer.split(b"\r\n\r\n", 1)
    assert b"chunked" not in head.lower() and b"Connection: close" in head
    assert body == b"abc"


async def test_admin_endpoints(plugway_gateway, aiohttp_raw_server):
    gateway = await start(plugway_gateway, aiohttp_raw_server)
    async with gateway.client.get("/api/x") as response:
        assert response.status == 200
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.admin_url + "/health") as response:
            assert response.status == 200
        async with session.get(gateway.admin_url + "/ready") as response:
            assert (await response.json()) == {"status": "ready"}
        async with session.get(gateway.admin_url + "/metrics") as response:
            text = await response.text()
    assert 'plugway_requests_total{method="GET",route="api",status_class="2xx"} 1.0' in text
    assert "plugway_request_duration_seconds_bucket" in text
    assert 'plugway_upstream_response_seconds_count{upstream="app"} 1.0' in text
    assert "plugway_requests_in_flight" in text


@pytest.fixture
def upstream_ca(tmp_path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path)


@pytest.fixture
def other_ca(tmp_path) -> CertificateAuthority:
    """A CA that signed nothing the tests serve."""
    (tmp_path / "other").mkdir()
    return CertificateAuthority(tmp_path / "other")


@pytest.fixture
async def https_upstream(upstream_ca):
    """Factory: ``await https_upstream(*dns_names)`` -> a ``TlsRawUpstream`` answering "secure",
    with a certificate for those names signed by ``upstream_ca``."""
    started = []

    async def start(*names: str) -> TlsRawUpstream:
        cert, key, _ = upstream_ca.issue(f"upstream-{len(started)}", *names)
        upstream = await TlsRawUpstream(lambda request: http_response(body=b"secure"), cert, key).start()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        await upstream.close()


def verified_by(ca_path, upstream_url: str, settings: str = "") -> str:
    return route_config(upstream_url, upstream=f'tls_ca_file = "{ca_path}"\n{settings}')


async def test_an_https_target_is_verified_and_sent_its_name_by_sni(plugway_gateway, https_upstream, upstream_ca):
    upstream = await https_upstream("localhost")
    gateway = await plugway_gateway(verified_by(upstream_ca.ca_file, upstream.url))
    for _ in range(3):
        async with gateway.client.get("/api/x") as response:
            assert response.status == 200 and await response.read() == b"secure"
    assert upstream.server_names == ["localhost"]  # one handshake, kept alive, with the target's name
    assert b"\r\nHost: localhost:%d\r\n" % upstream.port in upstream.received[0]


async def test_an_https_target_that_fails_verification_is_a_502(
    plugway_gateway, https_upstream, upstream_ca, other_ca, caplog,
):
    right_name = await https_upstream("localhost")
    wrong_name = await https_upstream("elsewhere.example")
    for ca, upstream in ((other_ca, right_name), (upstream_ca, wrong_name)):
        gateway = await plugway_gateway(verified_by(ca.ca_file, upstream.url))
        async with gateway.client.get("/api/x") as response:
            assert response.status == 502
            assert (await response.json())["error"]["code"] == "upstream_unreachable"
    assert right_name.received == wrong_name.received == []
    assert not [r for r in caplog.records if r.name.startswith("plugway") and r.exc_info]  # refused, not crashed


async def test_tls_verification_can_be_turned_off(plugway_gateway, https_upstream, other_ca):
    upstream = await https_upstream("elsewhere.example")
    gateway = await plugway_gateway(verified_by(other_ca.ca_file, upstream.url, "tls_verify = false"))
    async with gateway.client.get("/api/x") as response:
        assert response.status == 200 and await response.read() == b"secure"
