"""WebSocket proxying end to end: the websockets library as the client, a real aiohttp upstream."""

from __future__ import annotations

import asyncio
import os

import pytest
import websockets
from websockets.asyncio.server import serve

from gateway import Consumer, GatewayError, PluginDeclaration, hookimpl
from wsframes import frame, raw_handshake
from wsupstream import UpstreamRecord, ws_handler

MIB = 1 << 20


class Identity:
    """Stands in for an auth plugin (priority 1000): a consumer and its header for the upstream."""

    @hookimpl
    def declare_plugin(self):
        return PluginDeclaration(priority=1000)

    @hookimpl
    def on_request(self, ctx):
        ctx.consumer = Consumer(ctx.request.headers.get("X-Test-User", "alice"))

    @hookimpl
    def before_upstream(self, ctx, outgoing):
        outgoing.headers["X-Consumer-ID"] = ctx.consumer.id


class Below:
    """A plugin below the websocket plugin (priority 100): it never sees a handshake."""

    @hookimpl
    def declare_plugin(self):
        return PluginDeclaration(priority=100)

    @hookimpl
    def before_upstream(self, ctx, outgoing):
        outgoing.headers["X-Below"] = "yes"


class Exploding:
    """A plugin whose websocket_message hook fails on the text "boom"."""

    @hookimpl
    def declare_plugin(self):
        return PluginDeclaration(priority=400)

    @hookimpl
    def websocket_message(self, message):
        if message.data == "boom":
            raise RuntimeError("boom")


class Recorder:
    """Records its WebSocket hooks in ``events``; its (async) open hook fails for a client sending X-Fail-Open."""

    def __init__(self, upstream: UpstreamRecord) -> None:
        self.upstream = upstream
        self.events: list[tuple] = []

    @hookimpl
    def declare_plugin(self):
        return PluginDeclaration(priority=400)

    @hookimpl
    async def websocket_open(self, ctx):
        self.events.append(("open", len(self.upstream.handshakes)))  # handshakes the upstream had accepted
        if "X-Fail-Open" in ctx.request.headers:
            raise RuntimeError("no")

    @hookimpl
    def websocket_message(self, direction):
        self.events.append(("message", direction))

    @hookimpl
    def websocket_close(self, code):
        self.events.append(("close", code))


async def test_messages_echo_and_the_handshake_is_forwarded_like_http(plugway_gateway, ws_upstream, ws_config,
                                                                     ws_connect, ws_url):
    gateway = await plugway_gateway(ws_config(ws_upstream.base, extra="[plugins.identity]\n[plugins.below]\n"),
                                    plugins={"identity": Identity(), "below": Below()})
    async with ws_connect(ws_url(gateway, "/ws/echo?room=1"), additional_headers={
            "Cookie": "session=abc", "X-Forwarded-For": "6.6.6.6", "X-Consumer-ID": "mallory"}) as ws:
        await ws.send("hello")
        assert await ws.recv() == "hello"
        await ws.send(b"\x00\x01\xff")
        assert await ws.recv() == b"\x00\x01\xff"
        response = ws.response
    seen = ws_upstream.record.handshakes[0]
    headers = seen["headers"]
    assert seen["path"] == "/echo?room=1"  # strip_prefix applies as for HTTP
    assert headers["Cookie"] == "session=abc"
    assert headers["X-Forwarded-For"] == "127.0.0.1"  # the client's own value is not trusted
    assert headers["X-Request-ID"] == response.headers["X-Request-ID"]
    assert headers.getall("X-Consumer-ID") == ["alice"]  # set by the plugin above, the client's copy dropped
    assert "X-Below" not in headers  # a plugin below the websocket plugin never sees the handshake
    assert headers["Sec-WebSocket-Key"] != response.headers.get("Sec-WebSocket-Key")
    assert "Sec-WebSocket-Extensions" not in headers  # no extension is negotiated through the gateway
    assert headers["Host"] == ws_upstream.base.split("//")[1]  # the target's Host, as for HTTP
    assert response.status_code == 101
    assert response.headers["Set-Cookie"] == "upstream=1"  # the upstream's 101 headers reach the client


async def test_the_client_gets_the_subprotocol_the_upstream_chose(plugway_gateway, ws_upstream, ws_config,
                                                                 ws_connect, ws_url):
    gateway = await plugway_gateway(ws_config(ws_upstream.base))
    async with ws_connect(ws_url(gateway, "/ws/echo"), subprotocols=["chat.v1", "chat.v2", "json"]) as ws:
        assert ws.subprotocol == "chat.v2"  # the upstream prefers chat.v2 among the offer
    async with ws_connect(ws_url(gateway, "/ws/echo"), subprotocols=["chat.v1"]) as ws:
        assert ws.subprotocol is None  # the upstream chose none: neither does the client get one
    offers = [seen["headers"].get("Sec-WebSocket-Protocol") for seen in ws_upstream.record.handshakes]
    assert offers == ["chat.v1,chat.v2,json", "chat.v1"]
    assert [seen["protocol"] for seen in ws_upstream.record.handshakes] == ["chat.v2", None]


async def test_close_codes_and_reasons_pass_both_ways(plugway_gateway, ws_upstream, ws_config, ws_connect, ws_url,
                                                      eventually):
    gateway = await plugway_gateway(ws_config(ws_upstream.base))
    async with ws_connect(ws_url(gateway, "/ws/echo")) as ws:
        await ws.send("close-me")
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            await ws.recv()
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4001, "upstream says bye")

    ws = await ws_connect(ws_url(gateway, "/ws/echo"))
    await ws.send("hi")
    assert await ws.recv() == "hi"
    await ws.close(4002, "client says bye")
    assert (ws.close_code, ws.close_reason) == (4002, "client says bye")  # the gateway echoed the client's close
    await eventually(lambda: len(ws_upstream.record.closes) == 2)
    assert ws_upstream.record.closes[1] == (4002, "client says bye")
    await eventually(lambda: gateway.metric("plugway_websocket_connections", route="ws") == 0)
    assert gateway.metric("plugway_websocket_closes_total", route="ws", code="4001") == 1
    assert gateway.metric("plugway_websocket_closes_total", route="ws", code="4002") == 1


async def test_fragmented_messages_and_pings_pass_through(plugway_gateway, ws_upstream, ws_config, ws_connect, ws_url,
                                                          eventually):
    gateway = await plugway_gateway(ws_config(ws_upstream.base))
    async with ws_connect(ws_url(gateway, "/ws/echo")) as ws:
        await ws.send(["frag", "mented ", "text"])  # one message in three frames
        assert await ws.recv() == "fragmented text"
        await ws.send([b"\x01" * 70000, b"\x02" * 70000])
        assert await ws.recv() == b"\x01" * 70000 + b"\x02" * 70000
        pong = await ws.ping(b"from client")
        await asyncio.wait_for(pong, 5)  # the upstream's pong, relayed back
        await ws.send("ping-me")
        await eventually(lambda: ws_upstream.record.pongs == [b"from upstream"])  # the client's answer, relayed
    assert ws_upstream.record.received[:2] == ["fragmented text", b"\x01" * 70000 + b"\x02" * 70000]
    assert ws_upstream.record.pings == [b"from client"]


async def test_fragments_from_the_upstream_reach_the_client(plugway_gateway, ws_config, ws_connect, ws_url):
    async def fragments(connection):
        await connection.send(["up", "stream ", "frag"])
        await connection.send([b"a" * 1000, b"b"])
        await connection.wait_closed()

    async with serve(fragments, "127.0.0.1", 0) as upstream:
        port = upstream.sockets[0].getsockname()[1]
        gateway = await plugway_gateway(ws_config(f"http://127.0.0.1:{port}"))
        async with ws_connect(ws_url(gateway, "/ws/")) as ws:
            assert await ws.recv() == "upstream frag"
            assert await ws.recv() == b"a" * 1000 + b"b"


@pytest.mark.parametrize("limit, passes", [("16MiB", True), ("8MiB", False)])
async def test_a_10_mb_message_under_and_over_the_limit(plugway_gateway, ws_upstream, ws_config, ws_connect, ws_url,
                                                       eventually, limit, passes):
    gateway = await plugway_gateway(ws_config(ws_upstream.base, f'max_message_size = "{limit}"'))
    message = os.urandom(10_000_000)
    async with ws_connect(ws_url(gateway, "/ws/echo"), max_size=None) as ws:
        if passes:
            await ws.send(message)
            assert await ws.recv() == message
            return
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            await ws.send(message)  # the close may come while the message is still going out
            await ws.recv()
    assert closed.value.rcvd.code == 1009
    await eventually(lambda: ws_upstream.record.closes == [(1001, "client went away")])
    assert ws_upstream.record.received == []  # nothing of it went upstream
    assert gateway.metric("plugway_websocket_closes_total", route="ws", code="1009") == 1


async def test_an_upstream_message_over_the_limit_closes_the_client_with_1011(plugway_gateway, ws_upstream, ws_config,
                                                                             ws_connect, ws_url, eventually):
    gateway = await plugway_gateway(ws_config(ws_upstream.base, 'max_message_size = "1MiB"'))
    async with ws_connect(ws_url(gateway, f"/ws/flood?mib=2&size={2 * MIB}"), max_size=None) as ws:
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            await ws.recv()
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1011, "upstream went away")
    await eventually(lambda: ws_upstream.record.closes == [(1009, "")])


async def test_an_upstream_that_dies_closes_the_client_with_1011(plugway_gateway, ws_upstream, ws_config, ws_connect,
                                                               ws_url, eventually):
    gateway = await plugway_gateway(ws_config(ws_upstream.base))
    async with ws_connect(ws_url(gateway, "/ws/die")) as ws:
        await ws.send("last words")
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1011, "upstream went away")
    await eventually(lambda: gateway.metric("plugway_websocket_connections", route="ws") == 0)
    assert gateway.metric("plugway_websocket_closes_total", route="ws", code="1011") == 1


async def test_a_client_that_vanishes_closes_the_upstream_with_1001(plugway_gateway, ws_upstream, ws_config,
                                                                   eventually):
    gateway = await plugway_gateway(ws_config(ws_upstream.base))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(raw_handshake("/ws/echo"))
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
    writer.write(frame(0x1, b"still here"))
    assert await reader.readexactly(12) == b"\x81\x0astill here"
    writer.transport.abort()  # no close frame, no FIN: a reset
    await eventually(lambda: ws_upstream.record.closes == [(1001, "client went away")])
    await eventually(lambda: gateway.metric("plugway_websocket_connections", route="ws") == 0)
    assert gateway.metric("plugway_websocket_closes_total", route="ws", code="1006") == 1


async def test_upstream_failures_are_http_errors_never_a_tunnel(plugway_gateway, ws_upstream, ws_config, ws_connect,
                                                               ws_url, refused):
    async def silent(reader, writer):
        await reader.read(-1)  # takes the handshake and never answers

    silent_server = await asyncio.start_server(silent, "127.0.0.1", 0)
    silent_port = silent_server.sockets[0].getsockname()[1]
    with socket_reserved() as closed_port:
        gateway = await plugway_gateway(ws_config(ws_upstream.base, 'handshake_timeout = "300ms"', extra=f"""
            [[upstreams]]
            name = "down"
            targets = [{{ url = "http://127.0.0.1:{closed_port}" }}]
            [[upstreams]]
            name = "silent"
            targets = [{{ url = "http://127.0.0.1:{silent_port}" }}]
            [[routes]]
            name = "down"
            prefix = "/down"
            upstream = "down"
            [routes.plugins.websocket]
            [[routes]]
            name = "silent"
            prefix = "/silent"
            upstream = "silent"
            [routes.plugins.websocket]
            handshake_timeout = "300ms"
        """))
        status, body = await refused(ws_connect, ws_url(gateway, "/ws/refuse"))
        assert (status, body["error"]["code"]) == (502, "upstream_refused_websocket")
        assert "403" in body["error"]["message"]
        status, body = await refused(ws_connect, ws_url(gateway, "/down/x"))
        assert (status, body["error"]["code"]) == (502, "upstream_unreachable")
        status, body = await refused(ws_connect, ws_url(gateway, "/silent/x"))
        assert (status, body["error"]["code"]) == (504, "upstream_timeout")
    silent_server.close()
    assert gateway.metric("plugway_websocket_handshake_refusals_total", route="ws",
                          reason="upstream_refused_websocket") == 1
    assert gateway.metric("plugway_websocket_handshake_refusals_total", route="down", reason="upstream_unreachable") == 1
    assert gateway.metric("plugway_websocket_handshake_refusals_total", route="silent", reason="upstream_timeout") == 1
    assert gateway.metric("plugway_websocket_connections", route="ws") == 0


class socket_reserved:
    """A local port with nothing listening on it (bound, never listened to, for the test's duration)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.sock.close()


async def test_plain_http_is_proxied_unless_the_route_requires_websockets(plugway_gateway, ws_upstream, ws_config):
    gateway = await plugway_gateway(ws_config(ws_upstream.base, extra="""
        [[routes]]
        name = "only"
        prefix = "/only"
        strip_prefix = true
        upstream = "app"
        [routes.plugins.websocket]
        require_websocket = true
    """))
    async with gateway.client.get("/ws/plain") as response:
        assert (response.status, await response.text()) == (200, "plain http")
    async with gateway.client.get("/only/plain") as response:
        assert response.status == 426
        assert response.headers["Upgrade"] == "websocket"
        assert (await response.json())["error"]["code"] == "websocket_required"


@pytest.mark.parametrize("request_bytes, status, code", [
    (raw_handshake("/ws/echo", version="8"), 426, "unsupported_websocket_version"),
    (raw_handshake("/ws/echo", key="short"), 400, "bad_websocket_handshake"),
    (raw_handshake("/ws/echo").replace(b"Connection: Upgrade", b"Connection: keep-alive"), 400, "bad_websocket_handshake"),
    (raw_handshake("/ws/echo").replace(b"GET ", b"POST ").replace(b"\r\n\r\n", b"\r\nContent-Length: 0\r\n\r\n"), 400,
     "bad_websocket_handshake"),
])
async def test_malformed_handshakes_are_refused(plugway_gateway, ws_upstream, ws_config, request_bytes, status, code):
    gateway = await plugway_gateway(ws_config(ws_upstream.base, route='methods = ["GET", "POST"]'))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(request_bytes)
    answer = await reader.read(-1)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 %d " % status)
    assert b'"code":"%s"' % code.encode() in answer
    if status == 426:
        assert b"Sec-WebSocket-Version: 13\r\n" in answer
    assert ws_upstream.record.handshakes == []


async def test_unmasked_client_frames_close_the_connection_with_1002(plugway_gateway, ws_upstream, ws_config,
                                                                    eventually):
    gateway = await plugway_gateway(ws_config(ws_upstream.base))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(raw_handshake("/ws/echo"))
    await reader.readuntil(b"\r\n\r\n")
    writer.write(frame(0x1, b"masked"))
    assert await reader.readexactly(8) == b"\x81\x06masked"
    writer.write(frame(0x1, b"unmasked", mask=False))
    close = await reader.readexactly(4)
    assert close[:2] == b"\x88\x02" or close[0] == 0x88
    assert int.from_bytes(close[2:4], "big") == 1002
    writer.close()
    await eventually(lambda: ws_upstream.record.closes == [(1001, "client went away")])
    assert ws_upstream.record.received == ["masked"]


async def test_plugin_hooks_see_open_messages_and_close(plugway_gateway, ws_upstream, ws_config, ws_connect, ws_url,
                                                        eventually):
    from plugway_sample import EVENTS

    EVENTS.clear()
    gateway = await plugway_gateway(ws_config(ws_upstream.base, extra='[plugins.sample]\ntag = "upper"\n'))
    async with ws_connect(ws_url(gateway, "/ws/echo")) as ws:
        await ws.send("shout")
        assert await ws.recv() == "SHOUT"  # changed on its way up, echoed as changed
        await ws.send(b"drop")  # dropped by the sample plugin
        await ws.send(b"keep")
        assert await ws.recv() == b"keep"
    await eventually(lambda: "websocket_close:1000" in EVENTS)
    assert ws_upstream.record.received == ["SHOUT", b"keep"]


async def test_a_failing_message_hook_closes_the_client_with_1011(plugway_gateway, ws_upstream, ws_config, ws_connect,
                                                                ws_url, eventually):
    gateway = await plugway_gateway(ws_config(ws_upstream.base, extra="[plugins.exploding]\n"),
                                    plugins={"exploding": Exploding()})
    async with ws_connect(ws_url(gateway, "/ws/echo")) as ws:
        await ws.send("fine")
        assert await ws.recv() == "fine"
        await ws.send("boom")
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd.code == 1011
    await eventually(lambda: ws_upstream.record.closes == [(1001, "gateway error")])


async def test_websocket_open_is_called_once_both_sides_are_open(plugway_gateway, ws_upstream, ws_config, ws_connect,
                                                                ws_url, eventually):
    recorder = Recorder(ws_upstream.record)
    gateway = await plugway_gateway(ws_config(ws_upstream.base, extra="[plugins.recorder]\n"),
                                    plugins={"recorder": recorder})
    async with ws_connect(ws_url(gateway, "/ws/echo")) as ws:
        await ws.send("hi")
        assert await ws.recv() == "hi"
    await eventually(lambda: recorder.events[-1:] == [("close", 1000)])
    assert recorder.events == [("open", 1), ("message", "client"), ("message", "upstream"), ("close", 1000)]


async def test_a_failing_open_hook_closes_the_client_with_1011(plugway_gateway, ws_upstream, ws_config, ws_connect,
                                                               ws_url, eventually):
    recorder = Recorder(ws_upstream.record)
    gateway = await plugway_gateway(ws_config(ws_upstream.base, extra="[plugins.recorder]\n"),
                                    plugins={"recorder": recorder})
    async with ws_connect(ws_url(gateway, "/ws/echo"), additional_headers={"X-Fail-Open": "1"}) as ws:
        await ws.send("never relayed")
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            await ws.recv()
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1011, "gateway error")
    await eventually(lambda: ws_upstream.record.closes == [(1001, "gateway error")])
    await eventually(lambda: recorder.events[-1:] == [("close", 1011)])
    assert recorder.events == [("open", 1), ("close", 1011)]  # no message went through
    assert ws_upstream.record.received == []


async def test_metrics_count_connections_messages_and_bytes_by_direction(plugway_gateway, ws_upstream, ws_config,
                                                                         ws_connect, ws_url, eventually):
    gateway = await plugway_gateway(ws_config(ws_upstream.base))
    async with ws_connect(ws_url(gateway, "/ws/echo")) as first, ws_connect(ws_url(gateway, "/ws/echo")) as second:
        assert gateway.metric("plugway_websocket_connections", route="ws") == 2
        for ws in (first, second):
            await ws.send("12345")
            assert await ws.recv() == "12345"
        await first.send(b"\x00" * 1000)
        await first.recv()
    await eventually(lambda: gateway.metric("plugway_websocket_connections", route="ws") == 0)
    for direction in ("client", "upstream"):
        assert gateway.metric("plugway_websocket_messages_total", route="ws", direction=direction) == 3
        assert gateway.metric("plugway_websocket_bytes_total", route="ws", direction=direction) == 1010
    assert gateway.metric("plugway_websocket_closes_total", route="ws", code="1000") == 2


async def test_a_plugin_refusal_of_the_handshake_is_its_http_error(plugway_gateway, ws_upstream, ws_config,
                                                                   ws_connect, ws_url, refused):
    class Refuser:
        @hookimpl
        def declare_plugin(self):
            return PluginDeclaration(priority=1000)

        @hookimpl
        def on_request(self, ctx):
            if "X-Let-Me-In" not in ctx.request.headers:
                raise type("Forbidden", (GatewayError,), {"status": 403, "code": "forbidden"})()

    gateway = await plugway_gateway(ws_config(ws_upstream.base, extra="[plugins.refuser]\n"),
                                    plugins={"refuser": Refuser()})
    status, body = await refused(ws_connect, ws_url(gateway, "/ws/echo"))
    assert (status, body["error"]["code"]) == (403, "forbidden")
    async with ws_connect(ws_url(gateway, "/ws/echo"), additional_headers={"X-Let-Me-In": "1"}) as ws:
        await ws.send("in")
        assert await ws.recv() == "in"
    assert len(ws_upstream.record.handshakes) == 1
    assert gateway.metric("plugway_websocket_handshake_refusals_total", route="ws", reason="forbidden") == 1



async def test_a_wss_upstream_is_verified_and_proxied(plugway_gateway, ws_config, ws_connect, ws_url, tmp_path,
                                                     refused):
    import ssl

    from aiohttp import web

    certificate = self_signed_certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate, tmp_path / "key.pem")
    record = UpstreamRecord()
    server = web.Server(lambda request: ws_handler(request, record))
    listening = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0, ssl=context)
    port = listening.sockets[0].getsockname()[1]
    try:
        gateway = await plugway_gateway(ws_config(f"https://127.0.0.1:{port}", upstream_options=f'tls_ca_file = "{certificate}"', extra=f"""
            [[upstreams]]
            name = "unverified"
            targets = [{{ url = "https://127.0.0.1:{port}" }}]
            [[routes]]
            name = "other"
            prefix = "/other"
            strip_prefix = true
            upstream = "unverified"
            [routes.plugins.websocket]
        """))
        async with ws_connect(ws_url(gateway, "/ws/echo")) as ws:
            await ws.send("over tls")
            assert await ws.recv() == "over tls"
        status, body = await refused(ws_connect, ws_url(gateway, "/other/echo"))  # not signed by a known CA
        assert (status, body["error"]["code"]) == (502, "upstream_unreachable")
        assert record.received == ["over tls"]
    finally:
        listening.close()
        await server.shutdown(1)


def self_signed_certificate(directory) -> str:
    """A certificate for 127.0.0.1 that is its own CA, and its key (key.pem), in ``directory``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (directory / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path = directory / "cert.pem"
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return str(path)
