"""The cors plugin against the real gateway: browsers' preflights on raw sockets, actual requests, patterns."""

from __future__ import annotations

import asyncio
import json
import time

import jwt
import pytest
from aiohttp import web

from gateway.config.schema import ConfigErrors
from gateway.testing import proxy_config, route_table
from plugway_cors.policy import Origins

APP = "https://app.example.com"
HMAC_SECRET = "cors-tests-hmac-secret-of-32-bytes!"
# The real auth plugin (priority 1000, below cors' 2000): every request needs a bearer token.
AUTH = """
    [plugins.auth]
    [[plugins.auth.issuers]]
    name = "test"
    issuer = "https://issuer.test"
    algorithms = ["HS256"]
    hmac_keys = [{ secret = { env = "CORS_TEST_HMAC" } }]
"""


@pytest.fixture(autouse=True)
def hmac_secret(monkeypatch):
    monkeypatch.setenv("CORS_TEST_HMAC", HMAC_SECRET)


def bearer_token() -> str:
    now = int(time.time())
    claims = {"iss": "https://issuer.test", "sub": "alice", "iat": now, "exp": now + 600}
    return jwt.encode(claims, HMAC_SECRET, algorithm="HS256")


async def start(plugway_gateway, aiohttp_raw_server, cors: str, *, route: str = "", auth: bool = False,
                upstream_headers: dict[str, str] | None = None):
    """A gateway with routes /api (cors as configured) and /plain (cors off); returns it and the upstream's log."""
    seen = []

    async def handler(request):
        seen.append((request.method, request.path))
        return web.Response(text="upstream", headers=upstream_headers or {})

    upstream = await aiohttp_raw_server(handler)
    plugins = f"[plugins.cors]\n{cors}\n{AUTH if auth else ''}"
    gateway = await plugway_gateway(proxy_config(upstream.make_url(""), route=route,
                                                 routes=route_table("plain", cors="enabled = false"), plugins=plugins))
    return gateway, seen


async def raw_exchange(gateway, request: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    """Send ``request`` as is; return the status, the header lines in order and the body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:] if line]
        length = int(dict((k.lower(), v) for k, v in headers).get("content-length", "0"))
        body = await reader.readexactly(length)
    finally:
        writer.close()
    return int(lines[0].split()[1]), headers, body


def chrome_preflight(origin: str, method: str = "PUT", headers: str = "authorization,content-type",
                     path: str = "/api/items/7") -> bytes:
    """The preflight Chrome sends for fetch(url, {method, headers, credentials: "include"})."""
    return (
        f"OPTIONS {path} HTTP/1.1\r\n"
        "Host: api.example.com\r\n"
        "Connection: keep-alive\r\n"
        "Accept: */*\r\n"
        f"Access-Control-Request-Method: {method}\r\n"
        f"Access-Control-Request-Headers: {headers}\r\n"
        f"Origin: {origin}\r\n"
        "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36\r\n"
        "Sec-Fetch-Mode: cors\r\n"
        "Sec-Fetch-Site: same-site\r\n"
        "Sec-Fetch-Dest: empty\r\n"
        f"Referer: {origin}/\r\n"
        "Accept-Encoding: gzip, deflate, br, zstd\r\n"
        "Accept-Language: en-US,en;q=0.9\r\n"
        "\r\n"
    ).encode()


CREDENTIALED = """
    allow_origins = ["https://app.example.com", "https://*.example.com", "http://localhost:3000"]
    allow_headers = ["Authorization", "Content-Type", "X-Trace"]
    expose_headers = ["X-Total-Count"]
    allow_credentials = true
    max_age = "2h"
"""


def metrics_with_samples(gateway) -> str:
    """The exposition's sample lines (without HELP/TYPE comments)."""
    text = gateway.gateway.metrics.exposition().decode()
    return "\n".join(line for line in text.splitlines() if not line.startswith("#"))


def cors_headers(headers) -> dict[str, str]:
    items = headers.items() if hasattr(headers, "items") else headers
    return {name: value for name, value in items if name.lower().startswith("access-control-")}


async def test_a_browsers_preflight_is_answered_by_the_gateway_before_auth(plugway_gateway, aiohttp_raw_server):
    gateway, seen = await start(plugway_gateway, aiohttp_raw_server, CREDENTIALED, auth=True)
    status, headers, body = await raw_exchange(gateway, chrome_preflight(APP))
    assert status == 204 and body == b""
    assert cors_headers(headers) == {
        "Access-Control-Allow-Origin": APP,
        "Access-Control-Allow-Credentials": "true",
        "Access-Control-Allow-Methods": "GET, HEAD, POST, PUT, PATCH, DELETE",
        "Access-Control-Allow-Headers": "authorization, content-type",
        "Access-Control-Max-Age": "7200",
    }
    assert ("Vary", "Origin") in headers
    assert seen == []  # the upstream never saw it, and auth did not refuse it
    assert 'plugway_auth_failures_total' not in metrics_with_samples(gateway)
    metrics = gateway.gateway.metrics.exposition().decode()
    assert 'plugway_cors_preflights_total{result="allowed"} 1.0' in metrics


async def test_the_actual_request_gets_cors_headers_even_when_refused(plugway_gateway, aiohttp_raw_server):
    gateway, seen = await start(plugway_gateway, aiohttp_raw_server, CREDENTIALED, auth=True)
    async with gateway.client.put("/api/items/7", headers={"Origin": APP}) as response:
        assert response.status == 401  # and the page's script can read why
        assert cors_headers(response.headers) == {
            "Access-Control-Allow-Origin": APP,
            "Access-Control-Allow-Credentials": "true",
            "Access-Control-Expose-Headers": "X-Total-Count",
        }
        assert response.headers["Vary"] == "Origin"
    authorized = {"Origin": APP, "Authorization": f"Bearer {bearer_token()}"}
    async with gateway.client.put("/api/items/7", headers=authorized) as response:
        assert response.status == 200
        assert response.headers["Access-Control-Allow-Origin"] == APP
    assert seen == [("PUT", "/api/items/7")]


async def test_the_gateway_replaces_the_upstreams_cors_headers_and_merges_vary(plugway_gateway, aiohttp_raw_server):
    gateway, _ = await start(plugway_gateway, aiohttp_raw_server, CREDENTIALED, upstream_headers={
        "Access-Control-Allow-Origin": "*", "Access-Control-Allow-Methods": "TRACE", "Vary": "Accept-Encoding",
    })
    async with gateway.client.get("/api/x", headers={"Origin": "https://tenant.example.com"}) as response:
        assert response.headers.getall("Access-Control-Allow-Origin") == ["https://tenant.example.com"]
        assert "Access-Control-Allow-Methods" not in response.headers
        assert response.headers.getall("Vary") == ["Accept-Encoding, Origin"]
    async with gateway.client.get("/api/x", headers={"Origin": "https://evil.example.org"}) as response:
        assert cors_headers(response.headers) == {}
        assert response.headers["Vary"] == "Accept-Encoding, Origin"
    async with gateway.client.get("/api/x") as response:  # no Origin: the answer still depends on it
        assert response.headers["Vary"] == "Accept-Encoding, Origin"


async def test_a_disallowed_origin_method_or_header_gets_no_cors_headers(plugway_gateway, aiohttp_raw_server):
    gateway, seen = await start(plugway_gateway, aiohttp_raw_server, CREDENTIALED)
    refusals = {
        "origin": chrome_preflight("https://evil.com"),
        "method": chrome_preflight(APP, method="TRACE"),
        "request header X-Secret": chrome_preflight(APP, headers="content-type,x-secret"),
    }
    for what, request in refusals.items():
        status, headers, body = await raw_exchange(gateway, request)
        assert status == 403, what
        assert cors_headers(headers) == {}, what
        assert json.loads(body)["error"]["code"] == "cors_preflight_refused"
    assert seen == []
    async with gateway.client.delete("/api/x", headers={"Origin": "https://evil.com"}) as response:
        assert response.status == 200  # not a preflight: the browser, not the gateway, withholds the answer
        assert cors_headers(response.headers) == {}
    metrics = gateway.gateway.metrics.exposition().decode()
    assert 'plugway_cors_preflights_total{result="refused"} 3.0' in metrics


async def test_the_null_origin_is_allowed_only_when_listed(plugway_gateway, aiohttp_raw_server):
    gateway, _ = await start(plugway_gateway, aiohttp_raw_server, CREDENTIALED)
    status, headers, _ = await raw_exchange(gateway, chrome_preflight("null"))
    assert status == 403 and cors_headers(headers) == {}
    async with gateway.client.get("/api/x", headers={"Origin": "null"}) as response:
        assert "Access-Control-Allow-Origin" not in response.headers

    listed, _ = await start(plugway_gateway, aiohttp_raw_server, 'allow_origins = ["null"]')
    status, headers, _ = await raw_exchange(listed, chrome_preflight("null"))
    assert status == 204 and ("Access-Control-Allow-Origin", "null") in headers
    assert ("Vary", "Origin, Access-Control-Request-Headers") in headers


PATTERN_CASES = {
    "https://a.example.com": True,
    "https://xn--bcher-kva.example.com": True,
    "https://app-2.example.com": True,
    "https://example.com": False,
    "https://.example.com": False,
    "https://a.b.example.com": False,
    "https://evil.com?.example.com": False,
    "https://evil.com/.example.com": False,
    "https://evil.com#.example.com": False,
    "https://evil.com\\.example.com": False,
    "https://a.example.com.evil.com": False,
    "https://aexample.com": False,
    "https://-a.example.com": False,
    "https://a_b.example.com": False,
    "http://a.example.com": False,
    "https://a.example.com:8443": False,
    "https://a.example.com/": False,
}


async def test_one_label_patterns_through_the_gateway(plugway_gateway, aiohttp_raw_server):
    gateway, _ = await start(plugway_gateway, aiohttp_raw_server, 'allow_origins = ["https://*.example.com"]')
    answers = {}
    for origin in PATTERN_CASES:
        status, headers, _ = await raw_exchange(gateway, chrome_preflight(origin, method="GET", headers="x-a"))
        allowed = dict(headers).get("Access-Control-Allow-Origin")
        answers[origin] = status == 204 and allowed == origin
    assert answers == PATTERN_CASES


def test_patterns_with_a_port_and_exact_entries_are_anchored_too():
    origins = Origins.parse(["https://*.example.com:8443", "http://localhost:3000"])
    assert origins.allows("https://a.example.com:8443")
    assert not origins.allows("https://a.example.com")
    assert not origins.allows("https://a.example.com:84430")
    assert origins.allows("http://localhost:3000")
    assert not origins.allows("http://localhost:30000") and not origins.allows("http://localhost")


async def test_any_origin_without_credentials_answers_star_and_does_not_vary(plugway_gateway, aiohttp_raw_server):
    gateway, _ = await start(plugway_gateway, aiohttp_raw_server, 'allow_origins = ["*"]\nallow_methods = ["*"]')
    status, headers, _ = await raw_exchange(gateway, chrome_preflight("https://anyone.test", method="PURGE"))
    assert status == 204
    assert cors_headers(headers)["Access-Control-Allow-Origin"] == "*"
    assert cors_headers(headers)["Access-Control-Allow-Methods"] == "PURGE"
    assert ("Vary", "Access-Control-Request-Method, Access-Control-Request-Headers") in headers
    async with gateway.client.get("/api/x", headers={"Origin": "https://anyone.test"}) as response:
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert "Vary" not in response.headers
        assert "Access-Control-Allow-Credentials" not in response.headers


async def test_ordinary_options_requests_and_routes_without_cors_reach_the_upstream(plugway_gateway,
                                                                                   aiohttp_raw_server):
    gateway, seen = await start(plugway_gateway, aiohttp_raw_server, CREDENTIALED)
    async with gateway.client.options("/api/x", headers={"Origin": APP}) as response:
        assert response.status == 200 and await response.text() == "upstream"
        assert "Access-Control-Allow-Origin" not in response.headers  # OPTIONS is not in allow_methods
    status, headers, body = await raw_exchange(gateway, chrome_preflight(APP, path="/plain/x"))
    assert status == 200 and body == b"upstream" and cors_headers(headers) == {}
    assert seen == [("OPTIONS", "/api/x"), ("OPTIONS", "/plain/x")]


async def test_route_settings_override_the_global_ones(plugway_gateway, aiohttp_raw_server):
    gateway, _ = await start(plugway_gateway, aiohttp_raw_server, 'allow_origins = ["https://global.test"]', route="""
        [routes.plugins.cors]
        allow_origins = ["https://route.test"]
        allow_methods = ["GET"]
    """)
    status, headers, _ = await raw_exchange(gateway, chrome_preflight("https://route.test", method="GET"))
    assert status == 204 and dict(headers)["Access-Control-Allow-Methods"] == "GET"
    status, _, _ = await raw_exchange(gateway, chrome_preflight("https://global.test", method="GET"))
    assert status == 403


@pytest.mark.parametrize(("table", "message"), [
    ('allow_origins = ["*"]\nallow_credentials = true',
     'plugins.cors.allow_credentials: cannot be true with allow_origins = ["*"]: list the origins instead'),
    ('allow_origins = ["https://app.example.com/"]', "plugins.cors.allow_origins: entry 0 ('https://app.example.com/') "
     "is not an origin"),
    ('allow_origins = ["https://App.example.com"]', "plugins.cors.allow_origins: entry 0 "
     "('https://App.example.com') must be lower-case"),
    ('allow_origins = ["https://*.com"]', "plugins.cors.allow_origins: entry 0 ('https://*.com') would match every"),
    ('allow_origins = ["https://a.*.example.com"]', "plugins.cors.allow_origins: entry 0 ('https://a.*.example.com') "
     "is not an origin"),
    ('allow_origins = ["*", "https://a.test"]', 'plugins.cors.allow_origins: "*" already allows every origin'),
    ('allow_origins = ["https://a.test"]\nallow_methods = ["GET", "BAD METHOD"]',
     "plugins.cors.allow_methods: 'BAD METHOD' is not a valid method"),
    ('allow_origins = ["https://a.test"]\nallow_credentials = true\nexpose_headers = ["*"]',
     'plugins.cors.expose_headers: "*" exposes no header at all'),
    ("allow_methods = []", "plugins.cors.allow_origins: is required"),
])
async def test_unsafe_or_malformed_settings_are_refused(plugway_gateway, aiohttp_raw_server, table, message):
    with pytest.raises(ConfigErrors) as caught:
        await start(plugway_gateway, aiohttp_raw_server, table)
    assert any(str(error).startswith(message) for error in caught.value.errors), caught.value
