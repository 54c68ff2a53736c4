"""Origin checks, connection caps, the message rate and the idle timeout."""

from __future__ import annotations

import asyncio

import pytest
import websockets

from gateway.testing import HeaderIdentity  # stands in for an auth plugin: the consumer is X-Test-User when sent
from wsframes import raw_handshake


async def test_origins_outside_the_allow_list_are_refused(plugway_gateway, ws_upstream, ws_config, ws_connect, ws_url,
                                                          refused):
    gateway = await plugway_gateway(ws_config(
        ws_upstream.base, 'allowed_origins = ["https://app.example.com", "https://*.example.org"]'))
    url = ws_url(gateway, "/ws/echo")
    for origin in ("https://app.example.com", "https://APP.example.com:443", "https://eu.example.org",
                   f"http://127.0.0.1:{gateway.port}", None):  # listed, a wildcard, the gateway's own, no Origin
        async with ws_connect(url, origin=origin) as ws:
            await ws.send("ok")
            assert await ws.recv() == "ok"
    for origin in ("https://evil.example", "http://app.example.com", "https://app.example.com:8443",
                   "https://example.org", "https://app.example.com.evil.test", "null"):
        status, body = await refused(ws_connect, url, origin=origin)
        assert (status, body["error"]["code"]) == (403, "origin_not_allowed"), origin
    assert len(ws_upstream.record.handshakes) == 5  # the refused ones never reached the upstream
    assert gateway.metric("plugway_websocket_handshake_refusals_total", route="ws", reason="origin_not_allowed") == 6


async def test_by_default_only_the_gateways_own_origin_and_require_origin(plugway_gateway, ws_upstream, ws_config,
                                                                          ws_connect, ws_url, refused):
    gateway = await plugway_gateway(ws_config(ws_upstream.base, extra="""
        [[routes]]
        name = "browser"
        prefix = "/browser"
        strip_prefix = true
        upstream = "app"
        [routes.plugins.websocket]
        allowed_origins = ["*"]
        require_origin = true
    """))
    own = f"http://127.0.0.1:{gateway.port}"
    async with ws_connect(ws_url(gateway, "/ws/echo"), origin=own):
        pass
    status, _ = await refused(ws_connect, ws_url(gateway, "/ws/echo"), origin="https://elsewhere.example")
    assert status == 403
    async with ws_connect(ws_url(gateway, "/browser/echo"), origin="https://anywhere.example"):
        pass
    status, body = await refused(ws_connect, ws_url(gateway, "/browser/echo"))
    assert (status, body["error"]["code"]) == (403, "origin_not_allowed")


async def test_connections_are_capped_per_consumer_and_per_worker(plugway_gateway, ws_upstream, ws_config, ws_connect,
                                                                  ws_url, refused, eventually):
    gateway = await plugway_gateway(ws_config(ws_upstream.base, """
        max_connections_per_consumer = 2
        max_connections_per_worker = 3
    """, extra="[plugins.identity]\n"), plugins={"identity": HeaderIdentity()})
    url = ws_url(gateway, "/ws/echo")
    alice = {"additional_headers": {"X-Test-User": "alice"}}
    first, second = await ws_connect(url, **alice), await ws_connect(url, **alice)
    status, body = await refused(ws_connect, url, **alice)
    assert (status, body["error"]["code"]) == (429, "too_many_websockets")
    anonymous = await ws_connect(url)  # counted by client address: a different key than alice
    status, body = await refused(ws_connect, url, additional_headers={"X-Test-User": "bob"})
    assert (status, body["error"]["code"]) == (503, "websocket_capacity")  # the worker holds 3
    await first.close()
    await eventually(lambda: gateway.metric("plugway_websocket_connections", route="ws") == 2)
    async with ws_connect(url, **alice) as again:  # a slot is free again
        await again.send("back")
        assert await again.recv() == "back"
    for ws in (second, anonymous):
        await ws.close()
    assert gateway.metric("plugway_websocket_handshake_refusals_total", route="ws", reason="too_many_websockets") == 1
    assert gateway.metric("plugway_websocket_handshake_refusals_total", route="ws", reason="websocket_capacity") == 1
    # Four upgrades counted as requests once closed, but only the two refusals have a duration.
    await eventually(lambda: gateway.metric("plugway_requests_total", route="ws", method="GET",
                                            status_class="1xx") == 4)
    assert gateway.metric("plugway_request_duration_seconds_count", route="ws") == 2


async def test_a_client_over_its_message_rate_is_closed_with_1008(plugway_gateway, ws_upstream, ws_config, ws_connect,
                                                                  ws_url, eventually):
    gateway = await plugway_gateway(ws_config(ws_upstream.base, 'message_rate = "1/m"\nmessage_burst = 5'))
    async with ws_connect(ws_url(gateway, "/ws/echo")) as ws:
        for index in range(5):  # the burst (one message a minute refills it: not within this test)
            await ws.send(f"m{index}")
            assert await ws.recv() == f"m{index}"
        await ws.send("one too many")
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            await ws.recv()
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "message rate exceeded")
    await eventually(lambda: ws_upstream.record.closes == [(1001, "client went away")])
    assert ws_upstream.record.received == [f"m{index}" for index in range(5)]


async def test_the_message_rate_refills(plugway_gateway, ws_upstream, ws_config, ws_connect, ws_url):
    gateway = await plugway_gateway(ws_config(ws_upstream.base, 'message_rate = "20/s"\nmessage_burst = 2'))
    async with ws_connect(ws_url(gateway, "/ws/echo")) as ws:
        started = asyncio.get_running_loop().time()
        for index in range(6):  # 2 at once, then one every 50 ms keeps within the rate
            if index >= 2:
                await asyncio.sleep(0.06)
            await ws.send(f"m{index}")
            assert await ws.recv() == f"m{index}"
        assert asyncio.get_running_loop().time() - started < 5


async def test_idle_connections_are_closed_with_1001_and_traffic_keeps_them_open(plugway_gateway, ws_upstream,
                                                                                 ws_config, ws_connect, ws_url,
                                                                                 eventually):
    idle_timeout = 1.5
    gateway = await plugway_gateway(ws_config(ws_upstream.base, f'idle_timeout = "{idle_timeout * 1000:.0f}ms"'))
    loop = asyncio.get_running_loop()  # the gateway's clock too: it runs in this loop
    async with ws_connect(ws_url(gateway, "/ws/echo")) as ws:
        started = loop.time()
        while loop.time() - started < 2 * idle_timeout:  # an echo every 100 ms outlives the idle timeout
            last_sent = loop.time()
            await ws.send("tick")
            assert await ws.recv() == "tick"
            await asyncio.sleep(0.1)
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
        closed_at = loop.time()
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1001, "idle timeout")
    assert closed_at - last_sent >= idle_timeout  # the gateway's last activity on it came after last_sent
    await eventually(lambda: (1001, "idle timeout") in ws_upstream.record.closes)


async def test_the_heartbeat_cuts_a_client_that_stops_answering_and_keeps_one_that_answers(
        plugway_gateway, ws_upstream, ws_config, ws_connect, ws_url, eventually):
    # A pong has a second (half the heartbeat) to come back, through this loop: ample, however busy the machine.
    gateway = await plugway_gateway(ws_config(ws_upstream.base, 'heartbeat = "2s"'))
    async with ws_connect(ws_url(gateway, "/ws/echo")) as answering:  # the websockets library answers pings
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(raw_handshake("/ws/echo"))
        await reader.readuntil(b"\r\n\r\n")
        ping = await asyncio.wait_for(reader.readexactly(2), 10)
        assert ping == b"\x89\x00"  # the gateway's heartbeat ping; this client never answers
        assert await asyncio.wait_for(reader.read(), 10) == b""  # so its connection is cut
        writer.close()
        await eventually(lambda: (1001, "client went away") in ws_upstream.record.closes)
        # Quiet for longer, this one was pinged no later than the other and would have been cut no later: it answered.
        await answering.send("still alive")
        assert await answering.recv() == "still alive"
    assert ws_upstream.record.pongs == []  # pongs answering the gateway's own pings go no further
    assert gateway.metric("plugway_websocket_closes_total", route="ws", code="1006") == 1

