"""The versioning plugin through a real gateway and real upstreams."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime

import pytest
from aiohttp import web

from gateway import PluginDeclaration, config, hookimpl
from gateway.config.schema import ConfigErrors
from gateway.plugins import load_plugins


class Upstream:
    """A real HTTP upstream that records each request and answers with JSON naming itself."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[dict] = []
        self.url = ""

    async def start(self, aiohttp_raw_server) -> Upstream:
        async def handler(request):
            self.seen.append({"path": request.path_qs, "headers": dict(request.headers)})
            return web.json_response({"upstream": self.name, "path": request.path_qs})

        server = await aiohttp_raw_server(handler)
        self.url = str(server.make_url("")).rstrip("/")
        return self


def gateway_config(*upstreams: Upstream, route: str = "", plugin: str) -> str:
    tables = "".join(f'[[upstreams]]\nname = "{u.name}"\ntargets = [{{ url = "{u.url}" }}]\n' for u in upstreams)
    return f"""
[log]
access = false
{tables}
[[routes]]
name = "api"
prefix = "/api"
upstream = "{upstreams[0].name}"
{route}
[plugins.versioning]
{plugin}
"""


TWO_VERSIONS = """
default = "2"
[plugins.versioning.versions."1"]
[plugins.versioning.versions."2"]
"""


async def get_json(gateway, path: str, **kwargs) -> tuple[int, dict, dict]:
    async with gateway.client.get(path, **kwargs) as response:
        return response.status, dict(response.headers), json.loads(await response.read())


@pytest.fixture
async def app(aiohttp_raw_server):
    return await Upstream("app").start(aiohttp_raw_server)


# --- choosing the version -----------------------------------------------------------------------


async def test_the_url_prefix_chooses_the_version_and_is_removed_before_forwarding(plugway_gateway, app):
    gateway = await plugway_gateway(gateway_config(app, route="strip_prefix = true", plugin=TWO_VERSIONS))
    status, _, body = await get_json(gateway, "/api/v1/users/7?x=1")
    assert status == 200
    assert body["path"] == "/users/7?x=1"
    status, _, body = await get_json(gateway, "/api/v1")
    assert body["path"] == "/"


async def test_without_strip_prefix_only_the_version_segment_is_removed(plugway_gateway, app):
    gateway = await plugway_gateway(gateway_config(app, plugin=TWO_VERSIONS))
    _, _, body = await get_json(gateway, "/api/v2/users")
    assert body["path"] == "/api/users"


async def test_strip_path_false_forwards_the_version_segment(plugway_gateway, app):
    plugin = "strip_path = false\n" + TWO_VERSIONS
    gateway = await plugway_gateway(gateway_config(app, route="strip_prefix = true", plugin=plugin))
    _, _, body = await get_json(gateway, "/api/v1/users")
    assert body["path"] == "/v1/users"


@pytest.mark.parametrize("header", ["API-Version", "Accept-Version", "X-API-Version"])
async def test_each_default_header_chooses_the_version(plugway_gateway, aiohttp_raw_server, header):
    v1 = await Upstream("v1").start(aiohttp_raw_server)
    v2 = await Upstream("v2").start(aiohttp_raw_server)
    plugin = TWO_VERSIONS.replace('versions."1"]', 'versions."1"]\nupstream = "v1"')
    gateway = await plugway_gateway(gateway_config(v2, v1, plugin=plugin))
    _, _, body = await get_json(gateway, "/api/users", headers={header: "1"})
    assert body["upstream"] == "v1"
    _, _, body = await get_json(gateway, "/api/users", headers={header: "v2"})
    assert body["upstream"] == "v2"


async def test_the_header_names_are_configurable(plugway_gateway, app):
    gateway = await plugway_gateway(gateway_config(app, plugin='headers = ["X-Acme-Version"]\n' + TWO_VERSIONS.replace(
        'versions."1"]', 'versions."1"]\nheaders = { X-Chosen = "one" }')))
    await get_json(gateway, "/api/a", headers={"X-Acme-Version": "1"})
    await get_json(gateway, "/api/b", headers={"API-Version": "1"})
    assert app.seen[0]["headers"].get("X-Chosen") == "one"
    assert "X-Chosen" not in app.seen[1]["headers"]


async def test_a_media_type_parameter_chooses_the_version(plugway_gateway, app):
    plugin = TWO_VERSIONS.replace('versions."1"]', 'versions."1"]\npath_prefix = "/one"')
    gateway = await plugway_gateway(gateway_config(app, route="strip_prefix = true", plugin=plugin))
    accept = "text/html, application/vnd.acme+json; version=1"
    _, _, body = await get_json(gateway, "/api/users", headers={"Accept": accept})
    assert body["path"] == "/one/users"
    _, _, body = await get_json(gateway, "/api/users", headers={"Accept": "application/vnd.acme+json"})
    assert body["path"] == "/users"


async def test_a_query_parameter_chooses_the_version(plugway_gateway, app):
    plugin = 'query_parameter = "api-version"\n' + TWO_VERSIONS.replace(
        'versions."1"]', 'versions."1"]\npath_prefix = "/one"')
    gateway = await plugway_gateway(gateway_config(app, route="strip_prefix = true", plugin=plugin))
    _, _, body = await get_json(gateway, "/api/users?api-version=1&page=2")
    assert body["path"] == "/one/users?api-version=1&page=2"


class VersionReader:
    """A plugin running after versioning (lower priority) that reports the ``ctx.version`` it sees."""

    @hookimpl
    def declare_plugin(self):
        return PluginDeclaration(priority=100)

    @hookimpl
    def on_request(self, ctx):
        ctx.state["seen_version"] = ctx.version

    @hookimpl
    def on_response(self, ctx, response):
        response.headers["X-Seen-Version"] = str(ctx.state.get("seen_version"))


async def test_the_default_applies_when_no_version_is_given(plugway_gateway, app):
    gateway = await plugway_gateway(gateway_config(app, plugin=TWO_VERSIONS.replace(
        'versions."2"]', 'versions."2"]\nheaders = { X-Chosen = "two" }')))
    status, _, _ = await get_json(gateway, "/api/users")
    assert status == 200
    assert app.seen[0]["headers"]["X-Chosen"] == "two"


async def test_later_plugins_see_the_chosen_version_on_the_context(plugway_gateway, app):
    text = gateway_config(app, plugin=TWO_VERSIONS) + "[plugins.reader]\n"
    gateway = await plugway_gateway(text, plugins={"reader": VersionReader()})
    _, headers, _ = await get_json(gateway, "/api/v1/users")
    assert headers["X-Seen-Version"] == "1"
    _, headers, _ = await get_json(gateway, "/api/users", headers={"Accept-Version": "v2"})
    assert headers["X-Seen-Version"] == "2"


async def test_sources_are_read_in_the_configured_order(plugway_gateway, app):
    plugin = 'sources = ["query", "header"]\n' + TWO_VERSIONS.replace(
        'versions."1"]', 'versions."1"]\nheaders = { X-Chosen = "one" }').replace(
        'versions."2"]', 'versions."2"]\nheaders = { X-Chosen = "two" }')
    gateway = await plugway_gateway(gateway_config(app, plugin=plugin))
    await get_json(gateway, "/api/v1/users?version=2", headers={"API-Version": "1"})
    await get_json(gateway, "/api/v1/users", headers={"API-Version": "1"})
    assert [seen["headers"]["X-Chosen"] for seen in app.seen] == ["two", "one"]
    assert app.seen[0]["path"].startswith("/api/v1/users"), "the path is not a source here: nothing is stripped"


async def test_no_version_and_no_default_is_a_400_listing_the_versions(plugway_gateway, app):
    gateway = await plugway_gateway(gateway_config(app, plugin=TWO_VERSIONS.replace('default = "2"', "")))
    status, _, body = await get_json(gateway, "/api/users")
    assert status == 400
    assert body["error"]["code"] == "version_required"
    assert "supported versions: 1, 2" in body["error"]["message"]
    assert app.seen == []


@pytest.mark.parametrize("how", ["path", "header", "query"])
async def test_an_unknown_version_is_a_400_with_the_supported_versions(plugway_gateway, app, how):
    gateway = await plugway_gateway(gateway_config(app, plugin=TWO_VERSIONS))
    path, headers, spelled = {"path": ("/api/v3/users", {}, "v3"), "header": ("/api/users", {"API-Version": "3"}, "3"),
                              "query": ("/api/users?version=3", {}, "3")}[how]
    status, headers_out, body = await get_json(gateway, path, headers=headers)
    assert status == 400
    assert headers_out["Content-Type"] == "application/json"
    assert body["error"]["code"] == "unsupported_version"
    assert body["error"]["message"] == f'API version "{spelled}" is not supported; supported versions: 1, 2'
    assert body["error"]["request_id"] == headers_out["X-Request-ID"]
    assert app.seen == []


async def test_a_path_segment_that_is_no_version_is_left_alone(plugway_gateway, app):
    gateway = await plugway_gateway(gateway_config(app, route="strip_prefix = true", plugin=TWO_VERSIONS))
    status, _, body = await get_json(gateway, "/api/videos/v")
    assert status == 200
    assert body["path"] == "/videos/v"


async def test_each_version_routes_to_its_own_upstream(plugway_gateway, aiohttp_raw_server):
    v1 = await Upstream("v1").start(aiohttp_raw_server)
    v2 = await Upstream("v2").start(aiohttp_raw_server)
    plugin = TWO_VERSIONS.replace('versions."1"]', 'versions."1"]\nupstream = "v1"')
    gateway = await plugway_gateway(gateway_config(v2, v1, route="strip_prefix = true", plugin=plugin))
    _, _, one = await get_json(gateway, "/api/v1/users")
    _, _, two = await get_json(gateway, "/api/v2/users")
    assert (one["upstream"], one["path"]) == ("v1", "/users")
    assert (two["upstream"], two["path"]) == ("v2", "/users")


async def test_a_version_naming_an_unknown_upstream_is_a_config_error(plugway_gateway, app):
    from gateway.config.schema import ConfigErrors

    plugin = TWO_VERSIONS.replace('versions."1"]', 'versions."1"]\nupstream = "nowhere"')
    with pytest.raises(ConfigErrors) as caught:
        await plugway_gateway(gateway_config(app, plugin=plugin))
    assert [str(e) for e in caught.value.errors] == ['plugins.versioning.versions."1".upstream: unknown upstream "nowhere"']


# --- deprecation and sunset ---------------------------------------------------------------------


DEPRECATED = """
default = "2"
[plugins.versioning.versions."2"]
[plugins.versioning.versions."1"]
deprecated_at = 2025-06-01T00:00:00Z
sunset_at = "2099-12-31T23:59:59Z"
deprecation_link = "https://example.com/deprecated"
sunset_link = "https://example.com/sunset"
"""


async def test_a_deprecated_version_carries_deprecation_sunset_and_links(plugway_gateway, app):
    gateway = await plugway_gateway(gateway_config(app, plugin=DEPRECATED))
    async with gateway.client.get("/api/v1/users") as response:
        assert response.status == 200
        assert response.headers["Deprecation"] == "@1748736000"
        assert response.headers["Sunset"] == "Thu, 31 Dec 2099 23:59:59 GMT"
        assert sorted(response.headers.getall("Link")) == [
            '<https://example.com/deprecated>; rel="deprecation"; type="text/html"',
            '<https://example.com/sunset>; rel="sunset"; type="text/html"',
        ]
    async with gateway.client.get("/api/v2/users") as response:
        assert response.status == 200
        assert "Deprecation" not in response.headers and "Sunset" not in response.headers
        assert "Link" not in response.headers


async def test_only_the_configured_headers_are_sent(plugway_gateway, app):
    plugin = 'default = "1"\n[plugins.versioning.versions."1"]\nsunset_at = 2099-01-01\n'
    gateway = await plugway_gateway(gateway_config(app, plugin=plugin))
    async with gateway.client.get("/api/users") as response:
        assert response.headers["Sunset"] == "Thu, 01 Jan 2099 00:00:00 GMT"
        assert "Deprecation" not in response.headers and "Link" not in response.headers


async def test_after_its_sunset_a_version_answers_410_with_its_headers(plugway_gateway, app):
    plugin = DEPRECATED.replace('"2099-12-31T23:59:59Z"', "2024-01-01T00:00:00Z").replace("2025-06-01", "2023-06-01")
    gateway = await plugway_gateway(gateway_config(app, plugin=plugin))
    async with gateway.client.get("/api/v1/users") as response:
        body = json.loads(await response.read())
        assert response.status == 410
        assert body["error"]["code"] == "version_retired"
        assert body["error"]["message"] == (
            'API version "1" was retired on Mon, 01 Jan 2024 00:00:00 GMT; supported versions: 2'
        )
        assert response.headers["Sunset"] == "Mon, 01 Jan 2024 00:00:00 GMT"
        assert '<https://example.com/sunset>; rel="sunset"; type="text/html"' in response.headers.getall("Link")
    status, _, _ = await get_json(gateway, "/api/v2/users")
    assert status == 200
    assert [seen["path"] for seen in app.seen] == ["/api/users"]


async def test_the_sunset_is_compared_with_the_time_of_each_request(plugway_gateway, app):
    for delay in (2, 4, 8, 16):  # a machine too busy to answer before the sunset gets a later one
        sunset = (datetime.now(timezone.utc) + timedelta(seconds=delay)).replace(microsecond=0)
        plugin = f'default = "1"\n[plugins.versioning.versions."1"]\nsunset_at = "{sunset.isoformat()}"\n'
        gateway = await plugway_gateway(gateway_config(app, plugin=plugin))
        status, headers, _ = await get_json(gateway, "/api/users")
        if datetime.now(timezone.utc) < sunset:  # answered, so handled, before the sunset
            break
    assert status == 200
    assert parsedate_to_datetime(headers["Sunset"]) == sunset
    while status != 410:  # answered until the sunset, never for a request sent after it
        await asyncio.sleep(0.05)
        sent = datetime.now(timezone.utc)
        status, _, _ = await get_json(gateway, "/api/users")
        assert status == 410 or status == 200 and sent < sunset, (status, sent, sunset)
    assert datetime.now(timezone.utc) >= sunset


# --- metrics ------------------------------------------------------------------------------------


async def test_requests_are_counted_per_version_and_refusals_per_reason(plugway_gateway, app):
    gateway = await plugway_gateway(gateway_config(app, plugin=TWO_VERSIONS))
    for path in ("/api/v1/a", "/api/v1/b", "/api/v2/c", "/api/d", "/api/v9/e"):
        await get_json(gateway, path)
    assert gateway.metric("plugway_versioning_requests_total", route="api", version="1") == 2
    assert gateway.metric("plugway_versioning_requests_total", route="api", version="2") == 2
    assert gateway.metric("plugway_versioning_refused_total", route="api", reason="unsupported") == 1


# --- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize("plugin, error", [
    ('default = "3"\n[plugins.versioning.versions."1"]\n',
     'plugins.versioning.default: "3" is not one of the versions'),
    ("[plugins.versioning.versions]\n", "plugins.versioning.versions: needs at least one version"),
    ('[plugins.versioning.versions."1"]\nsunset_at = 2026-01-01T00:00:00\n', "needs a time zone offset"),
    ('[plugins.versioning.versions."1"]\nsunset_at = "next year"\n', "is not an RFC 3339 date-time"),
    ('[plugins.versioning.versions."1"]\nheaders = { Host = "x" }\n',
     "'Host' is not a header name this plugin may set"),
    ('[plugins.versioning.versions."1"]\nsunset_link = "https://x/ y"\n', "is not a URI usable in a Link header"),
    ('sources = ["path", "cookie"]\n[plugins.versioning.versions."1"]\n',
     "plugins.versioning.sources[1]: must be one of"),
    ('[plugins.versioning.versions."1 beta"]\n', "is not a version name"),
])
def test_invalid_settings_are_reported_with_their_path(plugin, error):
    text = 'upstreams = [{ name = "a", targets = [{ url = "http://127.0.0.1:1" }] }]\n' \
           'routes = [{ name = "r", prefix = "/", upstream = "a" }]\n[plugins.versioning]\n' + plugin
    with pytest.raises(ConfigErrors) as raised:
        load_plugins(config.loads(text))
    assert error in str(raised.value)
