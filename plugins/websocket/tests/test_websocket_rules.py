"""The plugin's pure parts: handshake and Origin rules, URLs, limits, the frame-header check, settings."""

from __future__ import annotations

import subprocess

import pytest
from multidict import CIMultiDict

from gateway.testing import PLUGWAY
from plugway_websocket.clientside import MaskedFramesOnly
from plugway_websocket.errors import BadHandshake, TooManyForConsumer, UnsupportedVersion, WorkerFull
from plugway_websocket.handshake import (
    OriginRule, check_allowed_origin, check_handshake, offered_protocols, relayed_response_headers, upstream_headers,
    upstream_url, wants_websocket,
)
from plugway_websocket.limits import Connections, MessageRate, consumer_key
from wsframes import frame

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def handshake_headers(**extra: str) -> CIMultiDict:
    headers = CIMultiDict({"Upgrade": "websocket", "Connection": "keep-alive, Upgrade", "Sec-WebSocket-Key": KEY,
                           "Sec-WebSocket-Version": "13"})
    for name, value in extra.items():
        headers[name.replace("_", "-")] = value
    return headers


def test_what_counts_as_a_handshake():
    assert wants_websocket(CIMultiDict({"Upgrade": "h2c, WebSocket"}))
    assert not wants_websocket(CIMultiDict({"Upgrade": "h2c"}))
    assert not wants_websocket(CIMultiDict())
    check_handshake("GET", (1, 1), handshake_headers())
    for method, version, headers in (
        ("POST", (1, 1), handshake_headers()), ("GET", (1, 0), handshake_headers()),
        ("GET", (1, 1), handshake_headers(Connection="keep-alive")),
        ("GET", (1, 1), handshake_headers(Sec_WebSocket_Key="dG9vIHNob3J0")),
        ("GET", (1, 1), handshake_headers(Sec_WebSocket_Key="not base64!!")),
    ):
        with pytest.raises(BadHandshake):
            check_handshake(method, version, headers)
    with pytest.raises(UnsupportedVersion) as refused:
        check_handshake("GET", (1, 1), handshake_headers(Sec_WebSocket_Version="8"))
    assert refused.value.headers == (("Sec-WebSocket-Version", "13"),)


def test_origin_rules():
    rule = OriginRule(("https://app.example.com", "https://*.example.org", "http://localhost:3000"), required=False)
    allowed = ("https://app.example.com", "HTTPS://App.Example.Com:443", "https://a.b.example.org",
               "http://localhost:3000", "https://gw.test")
    refused = ("https://app.example.com:444", "http://app.example.com", "https://example.org", "null", "garbage",
               "https://evil.test", "https://app.example.com.evil.test", "https://user@app.example.com",
               "https://app.example.com/path", "http://localhost:3001")
    for origin in allowed:
        assert rule.allows(origin, "https", "gw.test"), origin  # gw.test: the gateway's own origin
    for origin in refused:
        assert not rule.allows(origin, "https", "gw.test"), origin
    assert rule.allows(None, "https", "gw.test")
    assert not OriginRule((), required=True).allows(None, "https", "gw.test")
    assert OriginRule(("null",), required=False).allows("null", "https", "gw.test")
    assert OriginRule(("*",), required=True).allows("https://anything.test", "https", "gw.test")
    assert not OriginRule((), required=False).allows("http://gw.test", "https", "gw.test")  # scheme differs
    for entry in ("*", "null", "https://a.test", "http://*.a.test:8080"):
        check_allowed_origin(entry)
    for entry in ("a.test", "https://*", "https://a.*.test", "https://a.test/path", "ftp://a.test", "*.a.test"):
        with pytest.raises(ValueError):
            check_allowed_origin(entry)


def test_the_upstream_url_and_headers():
    assert str(upstream_url("http://10.0.0.5:9001", "/chat/caf%C3%A9", "a=1&b=%20")) == \
        "ws://10.0.0.5:9001/chat/caf%C3%A9?a=1&b=%20"
    assert str(upstream_url("https://events.internal", "/", "")) == "wss://events.internal/"
    outgoing = CIMultiDict([("Cookie", "a=1"), ("Sec-WebSocket-Key", KEY), ("Sec-WebSocket-Protocol", "x, y"),
                            ("Sec-WebSocket-Extensions", "permessage-deflate"), ("Host", "client.test"),
                            ("X-Request-ID", "r1")])
    assert upstream_headers(outgoing, "target:9001") == [("Cookie", "a=1"), ("X-Request-ID", "r1"),
                                                         ("Host", "target:9001")]
    assert offered_protocols(CIMultiDict([("Sec-WebSocket-Protocol", "a, b"), ("Sec-WebSocket-Protocol", "c")])) == \
        ["a", "b", "c"]
    answer = CIMultiDict([("Upgrade", "websocket"), ("Connection", "Upgrade, X-Hop"), ("X-Hop", "1"),
                          ("Sec-WebSocket-Accept", "abc"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"),
                          ("X-Request-ID", "upstream's"), ("Server", "up")])
    assert relayed_response_headers(answer, "X-Request-ID") == [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"),
                                                               ("Server", "up")]


def test_the_message_rate_is_a_token_bucket():
    now = [100.0]
    rate = MessageRate(10, 1.0, burst=3, clock=lambda: now[0])
    assert [rate.allow() for _ in range(4)] == [True, True, True, False]
    now[0] += 0.15  # one token back (and a half)
    assert [rate.allow(), rate.allow()] == [True, False]
    now[0] += 10
    assert sum(rate.allow() for _ in range(10)) == 3  # the bucket holds at most the burst


def test_connection_caps():
    connections = Connections()
    alice, bob = consumer_key("alice", "10.0.0.1"), consumer_key(None, "10.0.0.1")
    assert (alice, bob) == ("c:alice", "ip:10.0.0.1")
    connections.admit(alice, per_worker=3, per_consumer=2)
    connections.admit(alice, per_worker=3, per_consumer=2)
    with pytest.raises(TooManyForConsumer):
        connections.admit(alice, per_worker=3, per_consumer=2)
    connections.admit(bob, per_worker=3, per_consumer=2)
    with pytest.raises(WorkerFull):
        connections.admit(bob, per_worker=3, per_consumer=2)
    connections.release(alice)
    connections.release(alice)
    assert connections.by_consumer == {bob: 1} and connections.total == 1
    connections.admit(alice, per_worker=0, per_consumer=0)  # 0: no cap


class Parser:
    def __init__(self):
        self.fed = b""

    def feed_data(self, data):
        self.fed += data
        return False, b""

    def feed_eof(self):
        pass


class Queue:
    def __init__(self):
        self.exception = None

    def set_exception(self, exc):
        self.exception = exc


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_the_frame_check_follows_headers_split_anywhere(step):
    stream = frame(0x1, b"hello") + frame(0x2, b"x" * 125) + frame(0x9, b"") + _long_frame(70000) + frame(0x1, b"!")
    parser, queue = Parser(), Queue()
    check = MaskedFramesOnly(parser, queue)
    for start in range(0, len(stream), step):
        assert check.feed_data(stream[start:start + step]) == (False, b"")
    assert parser.fed == stream and queue.exception is None
    assert check.feed_data(frame(0x1, b"bare", mask=False)) == (True, b"")
    assert queue.exception.code == 1002
    assert check.feed_data(frame(0x1, b"after")) == (True, b"")  # nothing more reaches the parser
    assert parser.fed == stream


def _long_frame(length: int) -> bytes:
    return bytes([0x82, 0x80 | 127]) + length.to_bytes(8, "big") + b"\0\0\0\0" + b"\0" * length


@pytest.mark.parametrize("table, error", [
    ('allowed_origins = ["app.example.com"]', "allowed_origins[0]: 'app.example.com' is not an origin"),
    ('max_message_size = "0B"', "max_message_size: must be at least 1B"),
    ("max_connections_per_consumer = -1", "connection caps and message_burst must be 0 or more"),
    ('drain_timeout = "30s"', "drain_timeout: must be below server.graceful_timeout (30s)"),
    ('message_rate = "fast"', "message_rate:"),
])
def test_settings_are_checked_with_their_toml_path(tmp_path, ws_config, table, error):
    path = tmp_path / "plugway.toml"
    path.write_text(ws_config("http://127.0.0.1:9", table))
    result = subprocess.run([PLUGWAY, "check", "-c", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "routes[0].plugins.websocket." in result.stderr and error in result.stderr, result.stderr
