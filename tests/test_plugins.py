"""The plugin pipeline with a real third-party plugin distribution (tests/sample_plugin)."""

import subprocess
import textwrap
from dataclasses import dataclass

import plugway_sample
import pytest

from gateway import GatewayError, PluginDeclaration, Response, hookimpl, setting
from gateway.config.schema import ConfigErrors
from gateway.plugins import EMPTY_CHAIN, installed_plugins
from gateway.testing import route_table

from support import PLUGWAY, free_port, route_config


class Recorder:
    """An in-test plugin: records its hook calls beside the sample plugin's."""

    def __init__(self, priority: int, answer_with: int | None = None) -> None:
        self.priority = priority
        self.answer_with = answer_with

    @hookimpl
    def declare_plugin(self):
        return PluginDeclaration(priority=self.priority)

    @hookimpl
    def on_request(self, ctx):
        ctx.state.setdefault("order", []).append(f"recorder{self.priority}:on_request")
        if self.answer_with:
            return Response(self.answer_with, b"answered early")

    @hookimpl
    def before_upstream(self, ctx, outgoing):
        ctx.state.setdefault("order", []).append(f"recorder{self.priority}:before_upstream")

    @hookimpl
    def on_response(self, ctx, response):
        ctx.state.setdefault("order", []).append(f"recorder{self.priority}:on_response")
        response.headers["X-Order"] = ",".join(ctx.state["order"])


async def upstream_url(aiohttp_raw_server, body=b"upstream body"):
    from aiohttp import web

    seen = []

    async def handler(request):
        seen.append(dict(request.headers))
        return web.Response(body=body)

    server = await aiohttp_raw_server(handler)
    return str(server.make_url("")).rstrip("/"), seen


def test_the_sample_distribution_is_installed_and_found_by_entry_point():
    assert installed_plugins()["sample"].value == "plugway_sample"


async def test_hooks_run_in_priority_order_request_down_response_up(plugway_gateway, aiohttp_raw_server):
    url, seen = await upstream_url(aiohttp_raw_server)
    config = route_config(url, extra="""
        [plugins.sample]
        tag = "s"
        [plugins.early]
        [plugins.late]
    """)
    gateway = await plugway_gateway(config, plugins={"early": Recorder(900), "late": Recorder(100)})
    async with gateway.client.get("/api/x") as response:
        assert await response.read() == b"upstream body"
        order = response.headers["X-Order"].split(",")
    assert order == [
        "recorder900:on_request", "s:on_request", "recorder100:on_request",
        "recorder900:before_upstream", "s:before_upstream", "recorder100:before_upstream",
        "recorder100:on_response", "s:on_response", "recorder900:on_response",
    ]
    assert seen[0]["X-Sample-Tag"] == "s"
    assert "worker_started" in plugway_sample.EVENTS


async def test_a_short_circuit_skips_the_upstream_and_unwinds_through_outer_plugins_only(
    plugway_gateway, aiohttp_raw_server,
):
    url, seen = await upstream_url(aiohttp_raw_server)
    config = route_config(url, extra="[plugins.sample]\ntag = \"s\"\n[plugins.outer]\n[plugins.inner]\n")
    gateway = await plugway_gateway(config, plugins={"outer": Recorder(900), "inner": Recorder(100, answer_with=403)})
    async with gateway.client.get("/api/x") as response:
        assert response.status == 403
        assert await response.read() == b"answered early"
        assert response.headers["X-Order"] == (
            "recorder900:on_request,s:on_request,recorder100:on_request,s:on_response,recorder900:on_response"
        )
    assert seen == []


async def test_a_plugin_raising_a_gateway_error_gets_the_json_error(plugway_gateway, aiohttp_raw_server):
    url, seen = await upstream_url(aiohttp_raw_server)
    gateway = await plugway_gateway(route_config(url, extra="[plugins.sample]\nrefuse_with = 401\n"))
    async with gateway.client.get("/api/x") as response:
        assert response.status == 401
        body = await response.json()
        assert body["error"]["code"] == "sample_refused"
        assert body["error"]["request_id"] == response.headers["X-Request-ID"]
    assert seen == []


async def test_plugins_are_enabled_disabled_and_configured_per_route(plugway_gateway, aiohttp_raw_server):
    url, seen = await upstream_url(aiohttp_raw_server)
    config = route_config(url, route="""
        [routes.plugins.sample]
        tag = "route-level"
    """, extra=route_table("quiet", sample="enabled = false") + route_table("plain") + """
        [plugins.sample]
        tag = "global"
    """)
    gateway = await plugway_gateway(config)
    async with gateway.client.get("/api/x") as response:
        assert response.headers["X-Sample-Order"].startswith("route-level:")
    async with gateway.client.get("/quiet") as response:
        assert "X-Sample-Order" not in response.headers
    async with gateway.client.get("/plain") as response:
        assert response.headers["X-Sample-Order"].startswith("global:")
    routes = {route.name: route for route in gateway.gateway.router.routes}
    assert routes["quiet"].chain is EMPTY_CHAIN


async def test_a_plugin_enabled_only_on_one_route_costs_the_others_nothing(plugway_gateway, aiohttp_raw_server):
    url, _ = await upstream_url(aiohttp_raw_server)
    config = route_config(url, route="[routes.plugins.sample]\n", extra=route_table("bare"))
    gateway = await plugway_gateway(config)
    routes = {route.name: route for route in gateway.gateway.router.routes}
    assert routes["bare"].chain is EMPTY_CHAIN
    assert routes["api"].chain.plugins == ("sample",)
    async with gateway.client.get("/bare") as response:
        assert "X-Sample-Order" not in response.headers


async def test_on_error_may_replace_an_upstream_failure(plugway_gateway):
    config = route_config(f"http://127.0.0.1:{free_port()}", extra="[plugins.sample]\nfallback_status = 503\n")
    gateway = await plugway_gateway(config)
    async with gateway.client.get("/api/x") as response:
        assert response.status == 503
        assert await response.json() == {"fallback": "upstream_unreachable"}


async def test_on_response_may_rewrite_the_body_and_content_length_follows(plugway_gateway, aiohttp_raw_server):
    url, _ = await upstream_url(aiohttp_raw_server, body=b"abc")
    gateway = await plugway_gateway(route_config(url, extra='[plugins.sample]\nbody_suffix = "-changed"\n'))
    async with gateway.client.get("/api/x") as response:
        assert await response.read() == b"abc-changed"
        assert response.headers["Content-Length"] == "11"


async def test_after_response_sees_the_final_status(plugway_gateway, aiohttp_raw_server):
    url, _ = await upstream_url(aiohttp_raw_server)
    plugway_sample.EVENTS.clear()
    gateway = await plugway_gateway(route_config(url, extra="[plugins.sample]\n"))
    async with gateway.client.get("/api/x") as response:
        await response.read()
    await gateway.stop()
    assert "after_response:200" in plugway_sample.EVENTS
    assert plugway_sample.EVENTS[-2:] == ["worker_draining", "worker_stopping"]


async def test_a_plugin_bug_is_a_500_without_a_traceback(plugway_gateway, aiohttp_raw_server):
    class Buggy:
        @hookimpl
        def declare_plugin(self):
            return PluginDeclaration()

        @hookimpl
        def on_request(self, ctx):
            raise RuntimeError("secret internal detail")

    url, _ = await upstream_url(aiohttp_raw_server)
    gateway = await plugway_gateway(route_config(url, extra="[plugins.buggy]\n"), plugins={"buggy": Buggy()})
    async with gateway.client.get("/api/x") as response:
        assert response.status == 500
        text = await response.text()
    assert "secret" not in text and "Traceback" not in text
    assert '"code":"internal_error"' in text


async def test_a_header_injected_by_a_plugin_is_refused(plugway_gateway, aiohttp_raw_server):
    class Injector:
        @hookimpl
        def declare_plugin(self):
            return PluginDeclaration()

        @hookimpl
        def on_response(self, response):
            response.headers["X-Evil"] = "a\r\nSet-Cookie: stolen=1"

    url, _ = await upstream_url(aiohttp_raw_server)
    gateway = await plugway_gateway(route_config(url, extra="[plugins.inject]\n"), plugins={"inject": Injector()})
    async with gateway.client.get("/api/x") as response:
        assert response.status == 500
        assert "Set-Cookie" not in response.headers


def test_configured_priority_overrides_the_declared_one(tmp_path):
    from gateway import config
    from gateway.plugins import load_plugins

    settings = config.loads(route_config("http://127.0.0.1:1", extra="[plugins.sample]\npriority = 7\n"))
    assert load_plugins(settings).get("sample").priority == 7


@dataclass(frozen=True)
class NeedsKey:
    key: str = setting(doc="A required key.")


class Strict:
    @hookimpl
    def declare_plugin(self):
        return PluginDeclaration(settings=NeedsKey)


def test_plugin_settings_errors_are_reported_with_paths():
    from gateway import config
    from gateway.plugins import load_plugins

    text = route_config("http://127.0.0.1:1", route="[routes.plugins.strict]\nkye = 1\n", extra="[plugins.strict]\n")
    with pytest.raises(ConfigErrors) as caught:
        load_plugins(config.loads(text), extra={"strict": Strict()})
    messages = [str(error) for error in caught.value.errors]
    assert "plugins.strict.key: is required" in messages
    assert any(m.startswith("routes[0].plugins.strict.kye: unknown key") for m in messages)


def test_a_plugin_named_by_import_path_is_loaded(tmp_path):
    from gateway import config
    from gateway.plugins import load_plugins

    text = route_config("http://127.0.0.1:1", extra='[plugins."plugway_sample.pathplugin"]\n')
    plugins = load_plugins(config.loads(text))
    assert plugins.get("plugway_sample.pathplugin").route_settings == {"api": None}


def test_plugway_plugins_lists_version_priority_and_where_enabled(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(route_config("http://127.0.0.1:1", route="[routes.plugins.sample]\n"))
    output = subprocess.run([PLUGWAY, "plugins", "-c", str(path)], capture_output=True, text=True, check=True).stdout
    row = next(line for line in output.splitlines() if line.startswith("sample"))
    assert row.split() == ["sample", "1.2.3", "500", "routes:", "api"]


def test_an_async_hook_that_declines_does_not_stop_the_others():
    """pluggy's firstresult trap: an async impl returning None is a coroutine, not None. The pipeline awaits it."""
    import asyncio

    from gateway import config
    from gateway.plugins import load_plugins

    class Declines:
        @hookimpl
        def declare_plugin(self):
            return PluginDeclaration(priority=900)

        @hookimpl
        async def on_request(self, ctx):
            return None

    text = route_config("http://127.0.0.1:1", extra="[plugins.declines]\n[plugins.sample]\nrefuse_with = 418\n")
    chain = load_plugins(config.loads(text), extra={"declines": Declines()}).chain("api")
    assert [depth for depth, _ in chain.on_request] == [0, 1]

    async def run():
        from gateway import pipeline

        class Ctx:
            state = {}

        return await pipeline._request_phase(Ctx(), chain)

    response, depth = asyncio.run(run())
    assert response.status == 418 and depth == 1


def test_the_hook_specifications_are_each_documented_and_implemented_by_the_sample():
    from gateway import hookspecs

    hooks = [name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "plugway_spec")]
    assert set(hooks) == {"declare_plugin", "worker_started", "worker_draining", "worker_stopping", "admin_routes",
                          "cli_commands", "websocket_open", "websocket_message", "websocket_close",
                          "on_request", "before_upstream", "on_error", "on_response", "after_response"}
    for name in hooks:
        doc = textwrap.dedent(getattr(hookspecs, name).__doc__)
        assert "Called" in doc, name
        assert "Return" in doc or "return value" in doc, name
        assert "Example:" in doc, name
        assert hasattr(plugway_sample, name), name
    assert GatewayError.__doc__


class StatusAndEmptyChunks:
    """Changes the status and wraps the body with a stream that yields empty chunks."""

    @hookimpl
    def declare_plugin(self):
        return PluginDeclaration()

    @hookimpl
    def on_response(self, response):
        response.status = 201

        async def with_empty_chunks(stream):
            async for chunk in stream:
                yield b""
                yield chunk
                yield b""

        response.wrap_body(with_empty_chunks)


async def test_a_changed_status_gets_its_own_reason_and_empty_chunks_do_not_end_the_body(
    plugway_gateway, raw_upstream,
):
    from support import http_response, raw_exchange

    upstream = await raw_upstream(lambda request: http_response(200, b"whole body"))
    gateway = await plugway_gateway(route_config(upstream.url, extra="[plugins.change]\n"),
                                    plugins={"change": StatusAndEmptyChunks()})
    answer = await raw_exchange(gateway.port, b"GET /api/x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 201 Created\r\n")  # not the upstream's "200 X" phrase
    head, body = answer.split(b"\r\n\r\n", 1)
    assert b"Transfer-Encoding: chunked" in head
    assert body == b"a\r\nwhole body\r\n0\r\n\r\n"


async def test_options_on_a_route_without_options_reaches_plugins_then_405(plugway_gateway, aiohttp_raw_server):
    class AnswersPreflights:
        @hookimpl
        def declare_plugin(self):
            return PluginDeclaration(priority=2000)

        @hookimpl
        def on_request(self, ctx):
            if ctx.method == "OPTIONS" and "Access-Control-Request-Method" in ctx.request.headers:
                return Response(204)

    url, seen = await upstream_url(aiohttp_raw_server)
    config = route_config(url, route='methods = ["GET"]', extra="[plugins.preflight]\n")
    gateway = await plugway_gateway(config, plugins={"preflight": AnswersPreflights()})
    async with gateway.client.options("/api/x", headers={"Access-Control-Request-Method": "GET",
                                                          "Origin": "https://a.example"}) as response:
        assert response.status == 204
    async with gateway.client.options("/api/x") as response:
        assert response.status == 405
        assert response.headers["Allow"] == "GET, HEAD"
    assert seen == []


async def test_a_trusted_proxy_sets_the_scheme_plugins_see(plugway_gateway, aiohttp_raw_server):
    class RecordsScheme:
        @hookimpl
        def declare_plugin(self):
            return PluginDeclaration()

        @hookimpl
        def on_response(self, ctx, response):
            response.headers["X-Scheme"] = ctx.scheme

    url, seen = await upstream_url(aiohttp_raw_server)
    for trusted, expected in (('["127.0.0.1/32"]', "https"), ("[]", "http")):
        config = route_config(url, server=f"trusted_proxies = {trusted}", extra="[plugins.scheme]\n")
        gateway = await plugway_gateway(config, plugins={"scheme": RecordsScheme()})
        async with gateway.client.get("/api/x", headers={"X-Forwarded-Proto": "https"}) as response:
            assert response.headers["X-Scheme"] == expected


async def test_plugins_add_admin_endpoints_behind_the_admin_token(plugway_gateway, aiohttp_raw_server, monkeypatch):
    import aiohttp

    monkeypatch.setenv("SAMPLE_ADMIN_TOKEN", "t" * 20)
    url, _ = await upstream_url(aiohttp_raw_server)
    config = route_config(url, extra='[plugins.sample]\n[admin]\ntoken_env = "SAMPLE_ADMIN_TOKEN"\n')
    gateway = await plugway_gateway(config)
    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.admin_url + "/sample/counter") as response:
            assert response.status == 401
        for expected in (1, 2):
            async with session.post(gateway.admin_url + "/sample/counter",
                                    headers={"Authorization": "Bearer " + "t" * 20}) as response:
                assert (await response.json()) == {"calls": expected}


def test_plugins_add_subcommands_to_plugway():
    result = subprocess.run([PLUGWAY, "sample-hello", "ops"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "hello, ops\n"
    assert "sample-hello" not in subprocess.run([PLUGWAY, "--help"], capture_output=True, text=True).stdout


class Peek:
    """Answers each request itself with what a request of its own to the upstream got."""

    @hookimpl
    def declare_plugin(self):
        return PluginDeclaration(priority=500)

    @hookimpl
    async def on_request(self, ctx):
        async with ctx.upstream_request("GET", set_headers={"X-Peek": "1"}, remove_headers=("X-Secret",),
                                        hide_state=("hidden",)) as response:
            if response is None:
                return Response(200, b"answered by a hook")
            return Response(200, b"peeked: " + await response.read(1000))


class Tag:
    """before_upstream: marks what it sees; answers itself when the request asks it to."""

    @hookimpl
    def declare_plugin(self):
        return PluginDeclaration(priority=100)

    @hookimpl
    def on_request(self, ctx):
        ctx.state["hidden"] = True

    @hookimpl
    def before_upstream(self, ctx, outgoing):
        outgoing.headers["X-Hidden-Seen"] = str("hidden" in ctx.state)
        if ctx.request.headers.get("X-Answer") == "hook":
            return Response(418, b"no")
        return None


async def test_a_plugin_sends_a_request_of_its_own_through_the_route(plugway_gateway, aiohttp_raw_server):
    from aiohttp import web

    seen = []

    async def handler(request):
        seen.append((request.method, request.path, dict(request.headers), await request.read()))
        return web.Response(body=b"upstream body")

    url = str((await aiohttp_raw_server(handler)).make_url("")).rstrip("/")
    gateway = await plugway_gateway(route_config(url, extra="[plugins.peek]\n[plugins.tag]\n"),
                                    plugins={"peek": Peek(), "tag": Tag()})
    async with gateway.client.post("/api/items?x=1", data=b"the client's body", headers={"X-Secret": "s"}) as response:
        assert (response.status, await response.read()) == (200, b"peeked: upstream body")
    [(method, path, headers, body)] = seen
    assert (method, path, body) == ("GET", "/items", b"")  # the client's body stays with the client's request
    assert headers["X-Peek"] == "1" and "X-Secret" not in headers
    assert headers["X-Hidden-Seen"] == "False"  # before_upstream ran, without the hidden state
    assert headers["X-Request-ID"] == response.headers["X-Request-ID"]
    async with gateway.client.get("/api/items", headers={"X-Answer": "hook"}) as response:
        assert await response.read() == b"answered by a hook"
    assert len(seen) == 1
