"""The secheaders plugin against the real gateway, and the HSTS-over-TLS rule on the header policy."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import web
from multidict import CIMultiDict

from gateway.config.schema import ConfigErrors, parse_settings
from gateway.testing import free_port, proxy_config, route_table
from plugway_secheaders import SecHeadersSettings

DEFAULTS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "strict-origin-when-cross-origin",
    "Content-Security-Policy": "frame-ancestors 'none'",
}
SECURITY = (*DEFAULTS, "Strict-Transport-Security", "Permissions-Policy", "Cross-Origin-Opener-Policy")


async def start(plugway_gateway, aiohttp_raw_server, plugins: str, *, route: str = "",
                upstream_headers: dict[str, str] | None = None):
    """Routes /api (as configured), /off (secheaders disabled) and /dead (nothing listens)."""

    async def handler(request):
        return web.Response(text="upstream", headers={"X-Powered-By": "PHP/8.3", **(upstream_headers or {})})

    upstream = await aiohttp_raw_server(handler)
    dead = f'[[upstreams]]\nname = "dead"\ntargets = [{{ url = "http://127.0.0.1:{free_port()}" }}]\n'
    routes = dead + route_table("off", secheaders="enabled = false") + route_table("dead", upstream="dead")
    return await plugway_gateway(proxy_config(upstream.make_url(""), route=route, routes=routes, plugins=plugins))


def security_headers(response) -> dict[str, str]:
    return {name: response.headers[name] for name in SECURITY if name in response.headers}


async def test_defaults_over_plain_http_and_leaky_headers_removed(plugway_gateway, aiohttp_raw_server):
    gateway = await start(plugway_gateway, aiohttp_raw_server, "[plugins.secheaders]")
    async with gateway.client.get("/api/x") as response:
        assert await response.text() == "upstream"
        assert security_headers(response) == DEFAULTS  # no HSTS: this listener is plain HTTP
        assert "Server" not in response.headers and "X-Powered-By" not in response.headers
    async with gateway.client.get("/off/x") as response:
        assert security_headers(response) == {}
        assert response.headers["X-Powered-By"] == "PHP/8.3"
        assert response.headers["Server"].startswith("Python")


async def test_gateway_errors_get_the_headers_too(plugway_gateway, aiohttp_raw_server):
    gateway = await start(plugway_gateway, aiohttp_raw_server, "[plugins.secheaders]")
    async with gateway.client.get("/dead/x") as response:
        assert response.status == 502
        assert security_headers(response) == DEFAULTS


async def test_the_upstreams_own_values_win_unless_override(plugway_gateway, aiohttp_raw_server):
    page_policy = {"Content-Security-Policy": "default-src 'self'", "X-Frame-Options": "SAMEORIGIN"}
    gateway = await start(plugway_gateway, aiohttp_raw_server, "[plugins.secheaders]", upstream_headers=page_policy)
    async with gateway.client.get("/api/x") as response:
        assert security_headers(response) == {**DEFAULTS, **page_policy}
    gateway = await start(plugway_gateway, aiohttp_raw_server, "[plugins.secheaders]\noverride = true",
                          upstream_headers=page_policy)
    async with gateway.client.get("/api/x") as response:
        assert security_headers(response) == DEFAULTS
        assert response.headers.getall("Content-Security-Policy") == ["frame-ancestors 'none'"]


async def test_route_settings_turn_headers_off_add_others_and_remove_more(plugway_gateway, aiohttp_raw_server):
    gateway = await start(plugway_gateway, aiohttp_raw_server, "[plugins.secheaders]", route="""
        [routes.plugins.secheaders]
        x_frame_options = ""
        content_security_policy = ""
        permissions_policy = "camera=(), geolocation=()"
        headers = { "Cross-Origin-Opener-Policy" = "same-origin" }
        remove = ["Server", "X-Powered-By", "X-Backend"]
    """, upstream_headers={"X-Backend": "app-7.internal"})
    async with gateway.client.get("/api/x") as response:
        assert security_headers(response) == {
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "strict-origin-when-cross-origin",
            "Permissions-Policy": "camera=(), geolocation=()",
            "Cross-Origin-Opener-Policy": "same-origin",
        }
        assert "X-Backend" not in response.headers


def test_hsts_is_added_only_for_requests_that_came_over_tls():
    settings = parse_settings(SecHeadersSettings, {"strict_transport_security": "max-age=63072000; includeSubDomains"},
                              "plugins.secheaders", [])
    over_tls, plain = CIMultiDict(Server="nginx"), CIMultiDict(Server="nginx")
    settings.policy.apply(over_tls, tls=True)
    settings.policy.apply(plain, tls=False)
    assert over_tls["Strict-Transport-Security"] == "max-age=63072000; includeSubDomains"
    assert "Strict-Transport-Security" not in plain
    assert "Server" not in over_tls and plain["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize(("table", "message"), [
    ('referrer_policy = "strict-origin-when-crossorigin"',
     "plugins.secheaders.referrer_policy: 'strict-origin-when-crossorigin' is not a Referrer-Policy value"),
    ('strict_transport_security = "31536000"', 'plugins.secheaders.strict_transport_security: must be "max-age='),
    ('strict_transport_security = "max-age=300; preload"',
     "plugins.secheaders.strict_transport_security: preload requires includeSubDomains"),
    ('x_frame_options = "ALLOW-FROM https://a.test"', 'plugins.secheaders.x_frame_options: must be "DENY"'),
    ('remove = ["Content-Length"]', "plugins.secheaders.remove: Content-Length belongs to the gateway's framing"),
    ('headers = { "X-Note" = "a\\nb" }', "plugins.secheaders.headers: must not contain control characters"),
    ('headers = { "strict-transport-security" = "max-age=1" }',
     "plugins.secheaders.headers: strict-transport-security has its own setting"),
])
async def test_values_that_would_not_work_are_refused(plugway_gateway, aiohttp_raw_server, table, message):
    with pytest.raises(ConfigErrors) as caught:
        await start(plugway_gateway, aiohttp_raw_server, f"[plugins.secheaders]\n{table}")
    assert any(str(error).startswith(message) for error in caught.value.errors), caught.value


EXAMPLE_TLS = Path(__file__).resolve().parents[3] / "conf" / "examples" / "tls"


async def test_hsts_goes_out_over_a_tls_listener_and_behind_a_trusted_tls_proxy(plugway_gateway, aiohttp_raw_server):
    upstream = await aiohttp_raw_server(lambda request: web.Response(text="upstream"))
    url = upstream.make_url("")
    cert, key = EXAMPLE_TLS / "example-com.pem", EXAMPLE_TLS / "example-com.key"
    listener = f'{{ address = "127.0.0.1:0", tls = {{ certificates = [{{ cert = "{cert}", key = "{key}" }}] }} }}'
    tls = await plugway_gateway(proxy_config(url, server=f"listen = [{listener}]", plugins="[plugins.secheaders]"))
    async with tls.client.get("/api/x") as response:  # over TLS (the test client does not verify)
        assert response.url.scheme == "https"
        assert response.headers["Strict-Transport-Security"] == "max-age=31536000"
    proxied = await plugway_gateway(proxy_config(url, server='trusted_proxies = ["127.0.0.1/32"]',
                                                 plugins="[plugins.secheaders]"))
    async with proxied.client.get("/api/x", headers={"X-Forwarded-Proto": "https"}) as response:
        assert response.headers["Strict-Transport-Security"] == "max-age=31536000"
    async with proxied.client.get("/api/x", headers={"X-Forwarded-Proto": "http"}) as response:
        assert "Strict-Transport-Security" not in response.headers
