"""The compress plugin against the real gateway: negotiation, streaming, the never-compress cases, request bombs."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import zlib

import pytest
from aiohttp import web

from gateway.config.schema import ConfigErrors
from gateway.testing import proxy_config, route_table
from plugway_compress.codecs import BROTLI, BROTLI_DECODE
from plugway_compress.encoding import choose_encoding

try:
    import brotli
except ImportError:  # brotli is optional: its tests are skipped
    brotli = None

BIG = json.dumps([{"id": n, "name": f"item {n}", "tags": ["a", "b"]} for n in range(500)]).encode()
NO_AUTO = ("Accept-Encoding",)  # the client sends only the Accept-Encoding a test gives


class Upstream:
    """A real upstream with one behaviour per path; /stream waits for ``release`` halfway."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.received: list[dict] = []

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if path == "/api/stream":
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(b"data: first\n\n" * 100)
            await self.release.wait()
            await response.write(b"data: second\n\n" * 100)
            await response.write_eof()
            return response
        if path.endswith("/echo"):
            body = await request.read()
            self.received.append({"encoding": request.headers.get("Content-Encoding"), "length": len(body),
                                  "sha256": hashlib.sha256(body).hexdigest()})
            return web.Response(text="received")
        status = int(request.query.get("status", "200"))
        headers = {"ETag": '"v1"', "Accept-Ranges": "bytes", "Vary": "Cookie"}
        extra = request.query.get("header")
        if extra:
            name, _, value = extra.partition(":")
            headers[name] = value
        body = b"" if status in (204, 304) else BIG
        if path == "/api/small":
            body = BIG[:200]
        elif path == "/api/encoded":
            body, headers["Content-Encoding"] = gzip.compress(BIG), "gzip"
        if status not in (204, 304):
            headers["Content-Type"] = "image/png" if path == "/api/png" else "application/json; charset=utf-8"
        return web.Response(body=body, status=status, headers=headers)


async def start(plugway_gateway, aiohttp_raw_server, plugins: str = "[plugins.compress]", *, route: str = "",
                routes: str = "", server: str = ""):
    upstream = Upstream()
    raw = await aiohttp_raw_server(upstream.handle, auto_decompress=False)  # record bodies as they arrive
    gateway = await plugway_gateway(proxy_config(raw.make_url(""), server=server, route=route, routes=routes,
                                                 plugins=plugins))
    return gateway, upstream


async def fetch(gateway, path: str, accept: str | None = "gzip", method: str = "GET"):
    headers = {"Accept-Encoding": accept} if accept is not None else {}
    async with gateway.client.request(method, path, headers=headers, skip_auto_headers=NO_AUTO) as response:
        return response.status, response.headers, await response.read()


async def test_gzip_by_accept_encoding_with_vary_weak_etag_and_no_ranges(plugway_gateway, aiohttp_raw_server):
    gateway, _ = await start(plugway_gateway, aiohttp_raw_server)
    status, headers, body = await fetch(gateway, "/api/big", accept="deflate, gzip;q=0.8, zstd;q=0")
    assert status == 200
    assert headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(body) == BIG
    assert int(headers["Content-Length"]) == len(body) < len(BIG) // 5
    assert headers["Vary"] == "Cookie, Accept-Encoding"
    assert headers["ETag"] == 'W/"v1"'
    assert "Accept-Ranges" not in headers
    metrics = gateway.gateway.metrics.exposition().decode()
    assert f'plugway_compress_bytes_in_total{{encoding="gzip"}} {float(len(BIG))}' in metrics
    assert f'plugway_compress_bytes_out_total{{encoding="gzip"}} {float(len(body))}' in metrics


async def test_clients_that_refuse_every_coding_get_identity_but_vary(plugway_gateway, aiohttp_raw_server):
    gateway, _ = await start(plugway_gateway, aiohttp_raw_server)
    for accept in (None, "", "identity", "gzip;q=0, br;q=0", "compress, zstd", "gzip;q=0.2, identity;q=0.9"):
        status, headers, body = await fetch(gateway, "/api/big", accept=accept)
        assert (status, body, headers.get("Content-Encoding")) == (200, BIG, None), accept
        assert headers["Vary"] == "Cookie, Accept-Encoding" and headers["ETag"] == '"v1"', accept


async def test_the_never_compress_cases_are_passed_through_untouched(plugway_gateway, aiohttp_raw_server):
    gateway, _ = await start(plugway_gateway, aiohttp_raw_server)
    cases = {
        "already encoded": ("/api/encoded", "GET"),
        "no-transform": ("/api/big?header=Cache-Control:public,%20no-transform", "GET"),
        "partial content": ("/api/big?status=206&header=Content-Range:bytes%200-99/200", "GET"),
        "no content": ("/api/big?status=204", "GET"),
        "not modified": ("/api/big?status=304", "GET"),
        "HEAD": ("/api/big", "HEAD"),
        "below min_size": ("/api/small", "GET"),
        "media type not listed": ("/api/png", "GET"),
    }
    for case, (path, method) in cases.items():
        status, headers, body = await fetch(gateway, path, accept="gzip, br", method=method)
        expected_encoding = "gzip" if case == "already encoded" else None
        assert headers.get("Content-Encoding") == expected_encoding, case
        assert headers["ETag"] == '"v1"' and headers["Accept-Ranges"] == "bytes", case
        if status not in (204, 304) and method != "HEAD":
            assert body == (gzip.compress(BIG) if case == "already encoded" else BIG[:200] if "min" in case else BIG)
    _, headers, _ = await fetch(gateway, "/api/small")
    assert headers["Vary"] == "Cookie"  # too small ever to be compressed: the answer does not vary


async def test_a_stream_is_compressed_chunk_by_chunk_without_buffering(plugway_gateway, aiohttp_raw_server):
    gateway, upstream = await start(plugway_gateway, aiohttp_raw_server)
    inflate = zlib.decompressobj(31)
    received = b""
    async with gateway.client.get("/api/stream", headers={"Accept-Encoding": "gzip"},
                                  skip_auto_headers=NO_AUTO) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        assert response.headers["Transfer-Encoding"] == "chunked"
        while b"data: first\n\n" * 100 not in received:
            chunk = await asyncio.wait_for(response.content.readany(), 10)
            assert chunk, "the stream ended before the first part arrived"
            received += inflate.decompress(chunk)
        assert b"second" not in received
        upstream.release.set()  # only now does the upstream send the rest
        received += inflate.decompress(await response.read())
    assert received == b"data: first\n\n" * 100 + b"data: second\n\n" * 100
    assert inflate.eof


@pytest.mark.skipif(not BROTLI, reason="brotli is not installed (pip install plugway-compress[brotli])")
async def test_brotli_is_preferred_on_equal_q_and_streams_too(plugway_gateway, aiohttp_raw_server):
    gateway, upstream = await start(plugway_gateway, aiohttp_raw_server)
    _, headers, body = await fetch(gateway, "/api/big", accept="gzip, deflate, br, zstd")
    assert headers["Content-Encoding"] == "br" and brotli.decompress(body) == BIG
    _, headers, body = await fetch(gateway, "/api/big", accept="br;q=0.5, gzip")
    assert headers["Content-Encoding"] == "gzip"
    upstream.release.set()
    _, headers, body = await fetch(gateway, "/api/stream", accept="br")
    assert headers["Content-Encoding"] == "br"
    assert brotli.decompress(body) == b"data: first\n\n" * 100 + b"data: second\n\n" * 100


async def test_routes_choose_their_codings_and_levels(plugway_gateway, aiohttp_raw_server):
    gateway, _ = await start(plugway_gateway, aiohttp_raw_server, """
        [plugins.compress]
        encodings = ["gzip"]
        min_size = "100KiB"
    """, route="""
        [routes.plugins.compress]
        min_size = "1KiB"
        gzip_level = 9
        types = ["application/*+json", "application/json"]
    """)
    _, headers, body = await fetch(gateway, "/api/big", accept="br, gzip;q=0.1")
    assert headers["Content-Encoding"] == "gzip"  # br is not offered by the global table
    assert body == gzip.compress(BIG, compresslevel=9, mtime=0) != gzip.compress(BIG, compresslevel=5, mtime=0)


def test_q_values_choose_the_coding():
    offered = ("br", "gzip")
    assert choose_encoding("gzip, br", offered) == "br"
    assert choose_encoding("gzip, br", ("gzip", "br")) == "gzip"
    assert choose_encoding("br;q=0.9, gzip", offered) == "gzip"
    assert choose_encoding("x-gzip", offered) == "gzip"
    assert choose_encoding("*;q=0.5", offered) == "br"
    assert choose_encoding("*;q=0.5, br;q=0", offered) == "gzip"
    assert choose_encoding("GZIP;Q=1.000", offered) == "gzip"
    assert choose_encoding("gzip;q=1.5, br;q=abc", offered) is None  # malformed q: entries ignored
    assert choose_encoding("identity;q=1, gzip;q=0.5", offered) is None
    assert choose_encoding("gzip;q=0.001", offered) == "gzip"


async def test_request_bodies_are_decompressed_only_where_allowed(plugway_gateway, aiohttp_raw_server):
    gateway, upstream = await start(plugway_gateway, aiohttp_raw_server, route="""
        [routes.plugins.compress]
        decompress_requests = true
        max_decompressed_size = "64KiB"
    """, routes=route_table("raw"))
    two_members = gzip.compress(BIG[:1000]) + gzip.compress(BIG[1000:])
    async with gateway.client.post("/api/echo", data=two_members, headers={"Content-Encoding": "gzip"}) as response:
        assert response.status == 200
    async with gateway.client.post("/raw/echo", data=two_members, headers={"Content-Encoding": "gzip"}) as response:
        assert response.status == 200
    assert upstream.received == [
        {"encoding": None, "length": len(BIG), "sha256": hashlib.sha256(BIG).hexdigest()},
        {"encoding": "gzip", "length": len(two_members), "sha256": hashlib.sha256(two_members).hexdigest()},
    ]


async def test_a_gzip_bomb_gets_413_and_never_reaches_the_upstream(plugway_gateway, aiohttp_raw_server):
    gateway, upstream = await start(plugway_gateway, aiohttp_raw_server, server='client_max_body = "16KiB"', route="""
        [routes.plugins.compress]
        decompress_requests = true
        max_decompressed_size = "1MiB"
    """)
    bomb = gzip.compress(b"\0" * (10 << 20))  # 10 KiB that inflate to 10 MiB
    assert len(bomb) < 16 << 10
    refusals = [
        (413, "decompressed_body_too_large", bomb, "gzip"),
        (400, "invalid_content_encoding", gzip.compress(BIG)[:-8], "gzip"),
        (413, "body_too_large", zlib.compress(os.urandom(20 << 10)), "deflate"),  # over client_max_body
    ]
    for status, code, data, coding in refusals:
        async with gateway.client.post("/api/echo", data=data, headers={"Content-Encoding": coding}) as response:
            body = json.loads(await response.read())
            assert (response.status, body["error"]["code"]) == (status, code)
            assert response.headers["Connection"] == "close"
    assert upstream.received == []


@pytest.mark.skipif(not BROTLI_DECODE, reason="brotli 1.2 or newer is not installed")
async def test_brotli_request_bodies_and_bombs(plugway_gateway, aiohttp_raw_server):
    gateway, upstream = await start(plugway_gateway, aiohttp_raw_server, route="""
        [routes.plugins.compress]
        decompress_requests = true
        max_decompressed_size = "1MiB"
    """)
    async with gateway.client.post("/api/echo", data=brotli.compress(BIG), headers={"Content-Encoding": "br"}) as ok:
        assert ok.status == 200
    bomb = brotli.compress(b"\0" * (16 << 20))
    async with gateway.client.post("/api/echo", data=bomb, headers={"Content-Encoding": "br"}) as refused:
        assert refused.status == 413
    assert upstream.received == [{"encoding": None, "length": len(BIG), "sha256": hashlib.sha256(BIG).hexdigest()}]


@pytest.mark.parametrize(("table", "message"), [
    ("gzip_level = 10", "plugins.compress.gzip_level: must be between 1 and 9"),
    ('encodings = ["gzip", "gzip"]', 'plugins.compress.encodings: must list "br", "gzip" or both, each once'),
    ('encodings = ["zstd"]', "plugins.compress.encodings[0]: must be one of 'br', 'gzip'"),
    ('types = ["text/html", "JSON"]', "plugins.compress.types: entry 1 ('JSON') is not a lower-case media type"),
])
async def test_bad_settings_are_refused(plugway_gateway, aiohttp_raw_server, table, message):
    with pytest.raises(ConfigErrors) as caught:
        await start(plugway_gateway, aiohttp_raw_server, f"[plugins.compress]\n{table}")
    assert any(str(error).startswith(message) for error in caught.value.errors), caught.value
