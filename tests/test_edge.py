"""Slow, greedy and early clients at the gateway's door."""

import asyncio
import logging
import time

from gateway.testing import route_table

from support import (
    async_wait_until, async_wait_until_quiet, http_response, open_small_buffered, raw_exchange, read_responses,
    route_config,
)


async def read_all(reader: asyncio.StreamReader, timeout: float = 10) -> bytes:
    return await asyncio.wait_for(reader.read(-1), timeout)


async def test_slowloris_is_closed_at_the_header_timeout(plugway_gateway, raw_upstream):
    upstream = await raw_upstream(lambda request: http_response())
    gateway = await plugway_gateway(route_config(upstream.url, server='client_header_timeout = "1500ms"'))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    started = time.monotonic()
    writer.write(b"GET /api/x HTTP/1.1\r\nHost: h\r\n")

    async def drip():
        for i in range(20):  # a header every 400 ms would never finish the head
            await asyncio.sleep(0.4)
            writer.write(b"X-Drip-%d: 1\r\n" % i)

    dripping = asyncio.create_task(drip())
    answer = await read_all(reader)
    elapsed = time.monotonic() - started
    dripping.cancel()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408") and b'"code":"header_timeout"' in answer
    assert 1.4 < elapsed < 1.5 + 1.0, elapsed
    assert upstream.received == []


async def test_an_idle_keepalive_connection_gets_a_new_header_timeout_per_request(plugway_gateway, raw_upstream):
    upstream = await raw_upstream(lambda request: http_response())
    gateway = await plugway_gateway(route_config(upstream.url, server='client_header_timeout = "1s"'))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    for _ in range(3):  # idle longer than the header timeout between requests: keepalive_timeout applies
        writer.write(b"GET /api/x HTTP/1.1\r\nHost: h\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\nok"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        await asyncio.sleep(1.3)
    writer.close()


async def test_a_slow_body_gets_408_at_the_body_timeout(plugway_gateway, raw_upstream):
    upstream = await raw_upstream(lambda request: http_response())
    gateway = await plugway_gateway(route_config(upstream.url, server='client_body_timeout = "1s"'))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    started = time.monotonic()
    writer.write(b"POST /api/x HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\nab")
    answer = await read_all(reader)
    elapsed = time.monotonic() - started
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408") and b'"code":"request_timeout"' in answer
    assert 0.9 < elapsed < 1.0 + 1.0, elapsed
    assert upstream.received == []


async def test_a_slow_streamed_body_is_cut_at_the_body_timeout(plugway_gateway, raw_upstream):
    upstream = await raw_upstream(lambda request: http_response())
    gateway = await plugway_gateway(route_config(upstream.url, server='client_body_timeout = "1s"'))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(b"POST /api/x HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\n" + b"a" * 70000)
    answer = await read_all(reader)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408")
    assert upstream.received == []  # the upstream never got a complete request


async def test_connection_caps_per_address_and_per_worker(plugway_gateway, raw_upstream):
    upstream = await raw_upstream(lambda request: http_response())
    gateway = await plugway_gateway(route_config(upstream.url, server="max_connections_per_ip = 3\nmax_connections = 5"))
    held = []
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(b"GET /api/x HTTP/1.1\r\nHost: h\r\n\r\n")
        await reader.readuntil(b"\r\n\r\nok")
        held.append((reader, writer))
    answer = await raw_exchange(gateway.port, b"GET /api/x HTTP/1.1\r\nHost: h\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 503") and b'"code":"too_many_connections"' in answer
    reader, writer = held[0]
    writer.write(b"GET /api/x HTTP/1.1\r\nHost: h\r\n\r\n")  # connections under the cap are still served
    assert (await reader.readuntil(b"\r\n\r\nok")).startswith(b"HTTP/1.1 200")
    # From another loopback address the per-address cap is fresh, but the worker cap (5) still holds.
    others = []
    for _ in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port, local_addr=("127.0.0.2", 0))
        writer.write(b"GET /api/x HTTP/1.1\r\nHost: h\r\n\r\n")
        await reader.readuntil(b"\r\n\r\nok")
        others.append(writer)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port, local_addr=("127.0.0.3", 0))
    assert (await read_all(reader)).startswith(b"HTTP/1.1 503")
    held[1][1].close()
    await async_wait_until(lambda: gateway.gateway.connections_by_ip.get("127.0.0.1") == 2)
    answer = await raw_exchange(gateway.port, b"GET /api/x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200")
    for _, writer in held:
        writer.close()
    for writer in others:
        writer.close()
    metrics = gateway.gateway.metrics.exposition().decode()
    assert 'plugway_connections_refused_total{reason="max_connections_per_ip"} 1.0' in metrics
    assert 'plugway_connections_refused_total{reason="max_connections"} 1.0' in metrics


async def test_refused_connections_are_logged_at_most_once_a_second_per_reason(plugway_gateway, raw_upstream, caplog):
    caplog.set_level(logging.INFO, logger="plugway.worker")
    upstream = await raw_upstream(lambda request: http_response())
    gateway = await plugway_gateway(route_config(upstream.url, server="max_connections_per_ip = 1"))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)  # holds the one allowed
    writer.write(b"GET /api/x HTTP/1.1\r\nHost: h\r\n\r\n")
    await reader.readuntil(b"\r\n\r\nok")
    started = asyncio.get_running_loop().time()
    for _ in range(30):
        assert (await raw_exchange(gateway.port, b"GET /api/x HTTP/1.1\r\nHost: h\r\n\r\n")).startswith(b"HTTP/1.1 503")
    seconds = asyncio.get_running_loop().time() - started
    lines = [record for record in caplog.records if record.getMessage().startswith("refused a connection")]
    assert 1 <= len(lines) <= int(seconds) + 1  # not one line per refusal
    writer.close()


async def test_a_refusal_goes_out_before_the_client_sends_its_body(plugway_gateway, raw_upstream):
    upstream = await raw_upstream(lambda request: http_response())
    gateway = await plugway_gateway(route_config(upstream.url, extra="[plugins.sample]\nrefuse_with = 401\n"))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(b"PUT /api/x HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\nExpect: 100-continue\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 401")  # no "100 Continue" first: the body was never invited
    assert upstream.received == []


async def test_requests_per_connection_are_capped(plugway_gateway, raw_upstream):
    upstream = await raw_upstream(lambda request: http_response())
    gateway = await plugway_gateway(route_config(upstream.url, server="max_requests_per_connection = 3"))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    heads = []
    for _ in range(3):
        writer.write(b"GET /api/x HTTP/1.1\r\nHost: h\r\n\r\n")
        heads.append(await asyncio.wait_for(reader.readuntil(b"\r\n\r\nok"), 5))
    assert b"Connection: close" not in heads[1] and b"Connection: close" in heads[2]
    assert await read_all(reader) == b""  # and the gateway closed it
    writer.close()


async def test_pipelined_requests_are_all_answered_in_order(plugway_gateway, aiohttp_raw_server):
    from aiohttp import web

    async def echo_path(request):
        return web.Response(text=request.path)

    server = await aiohttp_raw_server(echo_path)
    gateway = await plugway_gateway(route_config(str(server.make_url("")).rstrip("/")))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(b"".join(b"GET /api/%d HTTP/1.1\r\nHost: h\r\n\r\n" % i for i in range(200))
                 + b"GET /api/last HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    answer = await read_all(reader, 30)
    writer.close()
    bodies = [part.split(b"\r\n\r\n", 1)[1] for part in answer.split(b"HTTP/1.1 200 OK\r\n")[1:]]
    assert bodies == [b"/%d" % i for i in range(200)] + [b"/last"]


async def test_underscored_headers_can_be_allowed_but_identity_spellings_never(plugway_gateway, raw_upstream):
    upstream = await raw_upstream(lambda request: http_response())
    gateway = await plugway_gateway(route_config(upstream.url, server="underscores_in_headers = true"))
    await raw_exchange(gateway.port, b"GET /api/x HTTP/1.1\r\nHost: h\r\nMy_Header: 1\r\nX_Consumer_ID: admin\r\n"
                                     b"x_consumer_roles: admin\r\nConnection: close\r\n\r\n")
    seen = upstream.received[0].lower()
    assert b"my_header: 1" in seen
    assert b"consumer" not in seen


async def test_client_supplied_identity_headers_never_reach_the_upstream_on_any_route(plugway_gateway, raw_upstream):
    upstream = await raw_upstream(lambda request: http_response())
    server = 'identity_headers = ["X-User-ID", "X-Tenant"]'
    config = route_config(upstream.url, server=server, extra=route_table("other"))
    gateway = await plugway_gateway(config)
    for path in (b"/api/x", b"/other/x"):
        await raw_exchange(gateway.port, b"GET " + path + b" HTTP/1.1\r\nHost: h\r\nx-user-id: admin\r\n"
                                         b"X-TENANT: t1\r\nConnection: close\r\n\r\n")
    assert len(upstream.received) == 2
    for seen in upstream.received:
        assert b"admin" not in seen and b"t1" not in seen.lower()


async def test_an_idle_keepalive_connection_is_closed_after_the_keepalive_timeout(plugway_gateway, raw_upstream):
    upstream = await raw_upstream(lambda request: http_response())
    gateway = await plugway_gateway(route_config(upstream.url, server='keepalive_timeout = "1s"'))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(b"GET /api/x HTTP/1.1\r\nHost: h\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\nok"), 5)
    idle_from = time.monotonic()
    assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" not in head  # kept alive
    assert await read_all(reader, timeout=10) == b""  # then closed, without a word
    idle = time.monotonic() - idle_from
    writer.close()
    assert idle > 0.9, idle  # not before the timeout


async def test_a_pipelining_client_that_does_not_read_is_not_read_either(plugway_gateway, raw_upstream):
    """Responses fill the socket buffers, the gateway stops answering, its queue fills (aiohttp
    holds 32 parsed requests) and it stops reading: the rest stays with the client."""
    count = 2000
    upstream = await raw_upstream(lambda request: http_response(body=request.split(b" ")[1].ljust(16384)))
    gateway = await plugway_gateway(route_config(upstream.url, server="max_requests_per_connection = 5000"))
    reader, writer = await open_small_buffered(gateway.port)
    pad = b"X-Pad: " + b"p" * 7000 + b"\r\n"  # 7 KB a request, 14 MB in all
    writer.write(b"".join(b"GET /api/%d HTTP/1.1\r\nHost: h\r\n%b\r\n" % (i, pad) for i in range(count)))
    unsent = writer.transport.get_write_buffer_size
    await async_wait_until_quiet(lambda: (len(upstream.received), unsent()))
    assert len(upstream.received) < count // 2
    assert unsent() > 0  # the gateway took no more than it could answer
    responses = await read_responses(reader, count)
    writer.close()
    assert [status for status, _ in responses] == [200] * count
    assert [body.rstrip() for _, body in responses] == [b"/%d" % i for i in range(count)]
