"""The transform plugin through a real gateway and real upstreams (and, for the round trip, versioning)."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Callable

import pytest
from aiohttp import web

from gateway import Consumer, PluginDeclaration, config, hookimpl
from gateway.config.schema import ConfigErrors
from gateway.plugins import load_plugins


class Upstream:
    """A real upstream that records every request (raw body: no decompression) and answers with
    ``answer(request, body)``, by default a JSON echo of what it received."""

    def __init__(self, answer: Callable | None = None) -> None:
        self.answer = answer or echo
        self.seen: list[dict] = []
        self.url = ""

    async def start(self, aiohttp_raw_server) -> Upstream:
        async def handler(request):
            body = await request.read()
            self.seen.append({"method": request.method, "path": request.path_qs, "headers": request.headers,
                              "body": body})
            return self.answer(request, body)

        server = await aiohttp_raw_server(handler, auto_decompress=False)
        self.url = str(server.make_url("")).rstrip("/")
        return self

    @property
    def last(self) -> dict:
        return self.seen[-1]


def echo(request, body: bytes) -> web.Response:
    return web.json_response({"path": request.path_qs, "body": body.decode("latin-1")})


def json_answer(document, status: int = 200, headers: dict | None = None) -> Callable:
    return lambda request, body: web.Response(
        status=status, body=json.dumps(document).encode(), content_type="application/json", headers=headers,
    )


def gateway_config(upstream: Upstream, plugin: str, route: str = 'prefix = "/api"\nstrip_prefix = true') -> str:
    return f"""
[log]
access = false
[[upstreams]]
name = "app"
targets = [{{ url = "{upstream.url}" }}]
[[routes]]
name = "api"
upstream = "app"
{route}
[plugins.transform]
{plugin}
"""


async def post(gateway, path: str, data, content_type: str = "application/json", **headers: str):
    async with gateway.client.post(path, data=data, headers={"Content-Type": content_type, **headers}) as response:
        return response.status, response.headers, await response.read()


@pytest.fixture
async def upstream(aiohttp_raw_server):
    return await Upstream().start(aiohttp_raw_server)


class Authenticator:
    """Stands in for an auth plugin (priority 1000): the consumer is whoever X-Test-User names."""

    @hookimpl
    def declare_plugin(self):
        return PluginDeclaration(priority=1000)

    @hookimpl
    def on_request(self, ctx):
        user = ctx.request.headers.get("X-Test-User")
        if user:
            ctx.consumer = Consumer(id=user, claims={"tenant": "acme", "level": 3})


# --- request: headers, query, path --------------------------------------------------------------


async def test_request_headers_are_removed_renamed_set_and_added(plugway_gateway, upstream):
    gateway = await plugway_gateway(gateway_config(upstream, """
        [[plugins.transform.request]]
        remove_headers = ["X-Debug"]
        rename_headers = { X-Old = "X-New" }
        set_headers = { X-Set = "gateway", X-Replaced = "gateway" }
        add_headers = { X-Kept = "gateway", X-Added = "gateway" }
    """))
    async with gateway.client.get("/api/x", headers={
        "X-Debug": "1", "X-Old": "old", "X-Replaced": "client", "X-Kept": "client",
    }) as response:
        assert response.status == 200
    headers = upstream.last["headers"]
    assert "X-Debug" not in headers and "X-Old" not in headers
    assert headers["X-New"] == "old"
    assert headers["X-Set"] == "gateway" and headers.getall("X-Replaced") == ["gateway"]
    assert headers["X-Kept"] == "client", "add never replaces what the client sent"
    assert headers["X-Added"] == "gateway"


async def test_templates_read_the_consumer_path_header_and_query(plugway_gateway, upstream):
    text = gateway_config(upstream, """
        [[plugins.transform.request]]
        [plugins.transform.request.set_headers]
        X-Who = "{consumer.id}@{claim.tenant}/{claim.level} {path.id} {header.X-Tenant} {query.q} {{literal}}"
        [plugins.transform.request.add_headers]
        X-Version = "{version}"
    """, route='path = "/users/{id}"') + "[plugins.auth]\n"
    gateway = await plugway_gateway(text, plugins={"auth": Authenticator()})
    async with gateway.client.get("/users/42?q=a%20b", headers={"X-Tenant": "t1", "X-Test-User": "alice"}):
        pass
    headers = upstream.last["headers"]
    assert headers["X-Who"] == "alice@acme/3 42 t1 a b {literal}"
    assert "X-Version" not in headers, "a template whose value is missing (no version chosen) is skipped"
    async with gateway.client.get("/users/42?q=x", headers={"X-Tenant": "t1"}):
        pass
    assert "X-Who" not in upstream.last["headers"], "no consumer: the header is not set"


async def test_templates_never_read_identity_or_forwarding_headers_from_the_client(plugway_gateway, upstream):
    gateway = await plugway_gateway(gateway_config(upstream, """
        [[plugins.transform.request]]
        [plugins.transform.request.set_headers]
        X-A = "{header.X-Consumer-ID}"
        X-B = "{header.X-Forwarded-For}"
        X-C = "{header.X-Request-ID}"
    """))
    async with gateway.client.get("/api/x", headers={
        "X-Consumer-ID": "admin", "X-Forwarded-For": "10.0.0.1", "X-Request-ID": "forged",
    }):
        pass
    headers = upstream.last["headers"]
    assert "X-A" not in headers and "X-B" not in headers and "X-C" not in headers
    assert "X-Consumer-ID" not in headers


async def test_query_parameters_are_removed_renamed_set_and_added(plugway_gateway, upstream):
    gateway = await plugway_gateway(gateway_config(upstream, """
        [[plugins.transform.request]]
        remove_query = ["drop"]
        rename_query = { q = "search" }
        set_query = { page = "1", who = "{header.X-Who}" }
        add_query = { keep = "gateway", lang = "en" }
    """))
    async with gateway.client.get("/api/list?keep=%7Bclient%7D&drop=1&q=caf%C3%A9&page=9&page=8",
                                  headers={"X-Who": "a&b=c"}):
        pass
    assert upstream.last["path"] == "/list?keep=%7Bclient%7D&search=caf%C3%A9&page=1&who=a%26b%3Dc&lang=en"


async def test_the_path_is_rewritten_with_the_captures_of_a_regular_expression(plugway_gateway, upstream):
    gateway = await plugway_gateway(gateway_config(upstream, r"""
        [[plugins.transform.request]]
        path_pattern = '^/orders/(?P<order>[0-9]+)/items/([a-z]+)$'
        path_replace = "/v2/orders/{match.order}/lines/{match.2}"
    """))
    async with gateway.client.get("/api/orders/17/items/abc?x=1"):
        pass
    async with gateway.client.get("/api/orders/x/items/abc"):
        pass
    assert [seen["path"] for seen in upstream.seen] == ["/v2/orders/17/lines/abc?x=1", "/orders/x/items/abc"]


async def test_request_values_put_into_a_path_are_encoded_and_cannot_climb(plugway_gateway, upstream):
    gateway = await plugway_gateway(gateway_config(upstream, """
        [[plugins.transform.request]]
        path_pattern = '^/files$'
        path_replace = "/tenants/{header.X-Tenant}/files"
    """))
    async with gateway.client.get("/api/files", headers={"X-Tenant": "a b?c#d"}) as response:
        assert response.status == 200
    assert upstream.last["path"] == "/tenants/a%20b%3Fc%23d/files"
    for tenant in ("..", "../admin", "."):
        async with gateway.client.get("/api/files", headers={"X-Tenant": tenant}) as response:
            body = json.loads(await response.read())
            assert response.status == 400, tenant
            assert body["error"]["code"] == "bad_path"
    assert len(upstream.seen) == 1


# --- header injection ---------------------------------------------------------------------------


async def test_cr_lf_from_the_request_never_reaches_a_header(plugway_gateway, upstream):
    gateway = await plugway_gateway(gateway_config(upstream, """
        [[plugins.transform.request]]
        set_headers = { X-Tag = "{query.tag}" }
    """))
    for query in ("tag=a%0D%0AX-Evil:%201", "tag=a%0AX-Evil:1", "tag=a%0D", "tag=%00", "tag=%7F"):
        async with gateway.client.get(f"/api/x?{query}") as response:
            body = json.loads(await response.read())
            assert response.status == 400, query
            assert body["error"]["code"] == "invalid_header_value"
    assert upstream.seen == []
    async with gateway.client.get("/api/x?tag=caf%C3%A9%20%E2%82%AC") as response:
        assert response.status == 200
    assert upstream.last["headers"]["X-Tag"] == "café €", "non-ASCII text goes as UTF-8"


async def test_cr_lf_from_the_request_never_reaches_a_response_header(plugway_gateway, upstream):
    gateway = await plugway_gateway(gateway_config(upstream, """
        [[plugins.transform.response]]
        set_headers = { X-Echo = "{query.tag}" }
    """))
    async with gateway.client.get("/api/x?tag=a%0D%0ASet-Cookie:%20s=1") as response:
        assert response.status == 400
        assert "Set-Cookie" not in response.headers and "X-Echo" not in response.headers
        assert json.loads(await response.read())["error"]["code"] == "invalid_header_value"
    async with gateway.client.get("/api/x?tag=fine") as response:
        assert response.headers["X-Echo"] == "fine"


async def test_header_bytes_that_are_not_utf8_never_make_a_500(plugway_gateway, upstream):
    gateway = await plugway_gateway(gateway_config(upstream, """
        [[plugins.transform.request]]
        set_headers = { X-A = "{header.X-Name}" }
        set_query = { q = "{header.X-Name}" }
        set_body = { name = "{header.X-Name}" }
    """))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(b"POST /api/x HTTP/1.1\r\nHost: t\r\nX-Name: caf\xe9\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ")
    received = upstream.last
    assert received["headers"]["X-A"] == "caf?", "bytes that are not UTF-8 become '?'"
    assert received["path"] == "/x?q=caf%3F"
    assert json.loads(received["body"]) == {"name": "caf?"}


# --- request bodies -----------------------------------------------------------------------------


BODY_RULE = """
max_body = "{max_body}"
[[plugins.transform.request]]
rename_body = {{ name = "full_name", "items.*.qty" = "items.*.quantity" }}
remove_body = ["internal", "items.*.secret"]
set_body = {{ "meta.source" = "gateway", "meta.user" = "{{header.X-User}}", "meta.tags" = ["a", 1] }}
"""


async def test_json_body_fields_are_renamed_removed_and_set_and_the_length_follows(plugway_gateway, upstream):
    gateway = await plugway_gateway(gateway_config(upstream, BODY_RULE.format(max_body="1MiB")))
    document = {"name": "Ada", "internal": True, "items": [{"qty": 1, "secret": "x"}, {"qty": 2}], "meta": {"a": 1}}
    status, _, _ = await post(gateway, "/api/users", json.dumps(document), **{"X-User": "u1"})
    assert status == 200
    received = upstream.last
    assert json.loads(received["body"]) == {
        "full_name": "Ada", "items": [{"quantity": 1}, {"quantity": 2}],
        "meta": {"a": 1, "source": "gateway", "user": "u1", "tags": ["a", 1]},
    }
    assert int(received["headers"]["Content-Length"]) == len(received["body"])


async def test_a_body_at_max_body_is_transformed_and_one_byte_more_streams_untouched(plugway_gateway, upstream):
    base = json.dumps({"name": "x", "pad": ""})
    max_body = 200
    at_limit = json.dumps({"name": "x", "pad": "p" * (max_body - len(base))}).encode()
    over = json.dumps({"name": "x", "pad": "p" * (max_body - len(base) + 1)}).encode()
    assert (len(at_limit), len(over)) == (max_body, max_body + 1)
    gateway = await plugway_gateway(gateway_config(upstream, BODY_RULE.format(max_body=f"{max_body}B")))
    await post(gateway, "/api/users", at_limit)
    assert "full_name" in json.loads(upstream.last["body"])
    await post(gateway, "/api/users", over)
    assert upstream.last["body"] == over
    assert gateway.metric("plugway_transform_skipped_total", direction="request", reason="too_large") == 1
    assert gateway.metric("plugway_transform_bodies_total", direction="request") == 1


async def test_a_body_over_client_max_body_still_gets_the_core_413(plugway_gateway, upstream):
    text = "[server]\nclient_max_body = \"100B\"\n" + gateway_config(upstream, BODY_RULE.format(max_body="1MiB"))
    gateway = await plugway_gateway(text)
    status, _, body = await post(gateway, "/api/users", json.dumps({"name": "x" * 200}))
    assert status == 413
    assert json.loads(body)["error"]["code"] == "body_too_large"
    assert upstream.seen == []


async def test_a_body_that_is_not_json_streams_untouched(plugway_gateway, upstream):
    gateway = await plugway_gateway(gateway_config(upstream, BODY_RULE.format(max_body="1MiB")))
    original = b'{"name": "looks like JSON but is sent as text"}'
    await post(gateway, "/api/users", original, content_type="text/plain")
    assert upstream.last["body"] == original
    await post(gateway, "/api/users", b"name=x", content_type="application/x-www-form-urlencoded")
    assert upstream.last["body"] == b"name=x"
    assert gateway.metric("plugway_transform_skipped_total", direction="request", reason="not_json") == 2


async def test_a_vendor_json_media_type_is_transformed(plugway_gateway, upstream):
    gateway = await plugway_gateway(gateway_config(upstream, BODY_RULE.format(max_body="1MiB")))
    await post(gateway, "/api/users", b'{"name":"x"}', content_type="application/vnd.acme+json; charset=utf-8")
    assert json.loads(upstream.last["body"])["full_name"] == "x"


async def test_a_chunked_body_without_length_streams_untouched(plugway_gateway, upstream):
    gateway = await plugway_gateway(gateway_config(upstream, BODY_RULE.format(max_body="1MiB")))

    async def chunks():
        yield b'{"name":'
        yield b' "streamed"}'

    status, _, _ = await post(gateway, "/api/users", chunks())
    assert status == 200
    assert upstream.last["body"] == b'{"name": "streamed"}'
    assert upstream.last["headers"]["Transfer-Encoding"] == "chunked"
    assert gateway.metric("plugway_transform_skipped_total", direction="request", reason="no_length") == 1


async def test_an_invalid_json_body_is_a_400_json_error(plugway_gateway, upstream):
    gateway = await plugway_gateway(gateway_config(upstream, BODY_RULE.format(max_body="1MiB")))
    for invalid in (b'{"name": ', b"\xff\xfe", b'{"n": NaN}'):
        status, headers, body = await post(gateway, "/api/users", invalid)
        assert status == 400
        error = json.loads(body)["error"]
        assert error["code"] == "invalid_json"
        assert error["request_id"] == headers["X-Request-ID"]
    assert upstream.seen == []


async def test_a_number_json_cannot_write_back_leaves_the_body_untouched(plugway_gateway, upstream):
    gateway = await plugway_gateway(gateway_config(upstream, BODY_RULE.format(max_body="1MiB")))
    original = b'{"name": "big", "n": 1e400}'
    status, _, _ = await post(gateway, "/api/users", original)
    assert status == 200
    assert upstream.last["body"] == original
    assert gateway.metric("plugway_transform_skipped_total", direction="request",
                        reason="unsupported_number") == 1


async def test_an_invalid_json_body_passes_untouched_with_on_invalid_pass(plugway_gateway, upstream):
    rules = BODY_RULE.format(max_body="1MiB").replace('max_body = "1MiB"', 'max_body = "1MiB"\non_invalid = "pass"')
    gateway = await plugway_gateway(gateway_config(upstream, rules))
    status, _, _ = await post(gateway, "/api/users", b'{"name": ')
    assert status == 200
    assert upstream.last["body"] == b'{"name": '
    assert gateway.metric("plugway_transform_skipped_total", direction="request", reason="invalid_json") == 1


async def test_a_gzip_request_body_is_decompressed_transformed_and_compressed_again(plugway_gateway, upstream):
    gateway = await plugway_gateway(gateway_config(upstream, BODY_RULE.format(max_body="1MiB")))
    zipped = gzip.compress(b'{"name": "zipped"}')
    status, _, _ = await post(gateway, "/api/users", zipped, **{"Content-Encoding": "gzip"})
    assert status == 200
    received = upstream.last
    assert received["headers"]["Content-Encoding"] == "gzip"
    assert int(received["headers"]["Content-Length"]) == len(received["body"])
    assert json.loads(gzip.decompress(received["body"]))["full_name"] == "zipped"


async def test_a_gzip_body_passes_untouched_when_configured(plugway_gateway, upstream):
    rules = BODY_RULE.format(max_body="1MiB").replace('max_body = "1MiB"', 'max_body = "1MiB"\ncompressed = "pass"')
    gateway = await plugway_gateway(gateway_config(upstream, rules))
    original = gzip.compress(b'{"name": "zipped"}')
    await post(gateway, "/api/users", original, **{"Content-Encoding": "gzip"})
    assert upstream.last["body"] == original
    assert gateway.metric("plugway_transform_skipped_total", direction="request", reason="compressed") == 1


async def test_a_gzip_body_that_inflates_beyond_max_body_passes_untouched(plugway_gateway, upstream):
    gateway = await plugway_gateway(gateway_config(upstream, BODY_RULE.format(max_body="1KiB")))
    bomb = gzip.compress(json.dumps({"name": "x", "pad": " " * 100_000}).encode())
    assert len(bomb) < 1024
    await post(gateway, "/api/users", bomb, **{"Content-Encoding": "gzip"})
    assert upstream.last["body"] == bomb
    assert gateway.metric("plugway_transform_skipped_total", direction="request", reason="too_large") == 1


# --- responses ----------------------------------------------------------------------------------


RESPONSE_RULES = """
max_body = "{max_body}"
[[plugins.transform.response]]
statuses = [201]
set_status = 200
[[plugins.transform.response]]
rename_headers = {{ X-Total = "X-Count" }}
set_headers = {{ X-Served-For = "{{header.X-Client}}" }}
remove_headers = ["Server-Timing"]
rename_body = {{ full_name = "name" }}
remove_body = ["meta"]
set_body = {{ "links.self" = "/users/1" }}
"""
DOCUMENT = {"id": 1, "full_name": "Ada", "meta": {"internal": True}}


async def test_response_status_headers_and_body_are_transformed(plugway_gateway, aiohttp_raw_server):
    upstream = await Upstream(json_answer(DOCUMENT, 201, {"X-Total": "5", "Server-Timing": "db;dur=1"})).start(
        aiohttp_raw_server)
    gateway = await plugway_gateway(gateway_config(upstream, RESPONSE_RULES.format(max_body="1MiB")))
    async with gateway.client.get("/api/users/1", headers={"X-Client": "c1"}) as response:
        body = await response.read()
        assert response.status == 200
        assert response.reason == "OK"
        assert response.headers["X-Count"] == "5" and "X-Total" not in response.headers
        assert "Server-Timing" not in response.headers
        assert response.headers["X-Served-For"] == "c1"
        assert int(response.headers["Content-Length"]) == len(body)
    assert json.loads(body) == {"id": 1, "name": "Ada", "links": {"self": "/users/1"}}


async def test_response_rules_scoped_to_statuses_leave_others_alone(plugway_gateway, aiohttp_raw_server):
    upstream = await Upstream(json_answer(DOCUMENT, 202)).start(aiohttp_raw_server)
    gateway = await plugway_gateway(gateway_config(upstream, RESPONSE_RULES.format(max_body="1MiB")))
    async with gateway.client.get("/api/users/1") as response:
        assert response.status == 202


async def test_a_response_at_max_body_is_transformed_and_one_byte_more_streams(plugway_gateway, aiohttp_raw_server):
    size = {"value": 0}

    def answer(request, body):
        document = {"full_name": "x", "pad": ""}
        document["pad"] = "p" * (size["value"] - len(json.dumps(document)))
        return web.Response(body=json.dumps(document).encode(), content_type="application/json")

    upstream = await Upstream(answer).start(aiohttp_raw_server)
    gateway = await plugway_gateway(gateway_config(upstream, RESPONSE_RULES.format(max_body="300B")))
    size["value"] = 300
    async with gateway.client.get("/api/x") as response:
        assert "name" in json.loads(await response.read())
    size["value"] = 301
    async with gateway.client.get("/api/x") as response:
        body = await response.read()
        assert len(body) == 301 and "full_name" in json.loads(body)
    assert gateway.metric("plugway_transform_skipped_total", direction="response", reason="too_large") == 1


async def test_a_response_without_length_or_not_json_streams_untouched(plugway_gateway, aiohttp_raw_server):
    async def streamed(request):
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(b'{"full_name": "chunked"}')
        await response.write_eof()
        return response

    async def handler(request):
        if request.path == "/chunked":
            return await streamed(request)
        return web.Response(body=b'{"full_name": "text"}', content_type="text/plain")

    server = await aiohttp_raw_server(handler)
    upstream = Upstream()
    upstream.url = str(server.make_url("")).rstrip("/")
    gateway = await plugway_gateway(gateway_config(upstream, RESPONSE_RULES.format(max_body="1MiB")))
    async with gateway.client.get("/api/chunked") as response:
        assert json.loads(await response.read()) == {"full_name": "chunked"}
    async with gateway.client.get("/api/text") as response:
        assert await response.read() == b'{"full_name": "text"}'
    assert gateway.metric("plugway_transform_skipped_total", direction="response", reason="no_length") == 1
    assert gateway.metric("plugway_transform_skipped_total", direction="response", reason="not_json") == 1


async def test_a_gzip_response_is_transformed_and_compressed_again(plugway_gateway, aiohttp_raw_server):
    def answer(request, body):
        return web.Response(body=gzip.compress(json.dumps(DOCUMENT).encode()), content_type="application/json",
                            headers={"Content-Encoding": "gzip"})

    upstream = await Upstream(answer).start(aiohttp_raw_server)
    gateway = await plugway_gateway(gateway_config(upstream, RESPONSE_RULES.format(max_body="1MiB")))
    async with gateway.client.get("/api/users/1") as response:
        body = await response.read()
        assert response.headers["Content-Encoding"] == "gzip"
        assert int(response.headers["Content-Length"]) == len(body)
    assert json.loads(gzip.decompress(body)) == {"id": 1, "name": "Ada", "links": {"self": "/users/1"}}


async def test_an_invalid_json_response_passes_untouched(plugway_gateway, aiohttp_raw_server):
    upstream = await Upstream(lambda request, body: web.Response(body=b"{oops", content_type="application/json")).start(
        aiohttp_raw_server)
    gateway = await plugway_gateway(gateway_config(upstream, RESPONSE_RULES.format(max_body="1MiB")))
    async with gateway.client.get("/api/x") as response:
        assert response.status == 200
        assert await response.read() == b"{oops"
    assert gateway.metric("plugway_transform_skipped_total", direction="response", reason="invalid_json") == 1


# --- a v1 client talking to a v2 upstream (with the versioning plugin) ---------------------------


V1_ON_V2 = """
[plugins.versioning]
default = "2"
[plugins.versioning.versions."1"]
[plugins.versioning.versions."2"]

[[plugins.transform.request]]
versions = ["1"]
rename_body = { name = "full_name", mail = "email" }
set_headers = { X-Client-Version = "{version}" }
[[plugins.transform.response]]
versions = ["1"]
rename_body = { full_name = "name", email = "mail", "items.*.full_name" = "items.*.name" }
remove_body = ["created_at"]
[[plugins.transform.response]]
versions = ["1"]
statuses = [201]
set_status = 200
"""


def v2_users(request, body: bytes) -> web.Response:
    """A v2-only upstream: it wants and answers full_name/email, and creates with 201."""
    if request.method == "POST":
        sent = json.loads(body)
        if set(sent) != {"full_name", "email"}:
            return web.json_response({"error": f"v2 fields expected, got {sorted(sent)}"}, status=422)
        return web.json_response({**sent, "id": 7, "created_at": "2026-01-01"}, status=201)
    return web.json_response({"items": [{"id": 7, "full_name": "Ada"}]})


async def test_a_v1_client_talks_to_a_v2_upstream_through_body_rules_both_ways(plugway_gateway, aiohttp_raw_server):
    upstream = await Upstream(v2_users).start(aiohttp_raw_server)
    text = gateway_config(upstream, "").replace("[plugins.transform]\n", "") + "[plugins.transform]\n" + V1_ON_V2
    gateway = await plugway_gateway(text)

    status, _, body = await post(gateway, "/api/v1/users", json.dumps({"name": "Ada", "mail": "ada@example.com"}))
    assert (status, json.loads(body)) == (200, {"name": "Ada", "mail": "ada@example.com", "id": 7})
    assert upstream.last["path"] == "/users"
    assert upstream.last["headers"]["X-Client-Version"] == "1"

    async with gateway.client.get("/api/v1/users") as response:
        assert json.loads(await response.read()) == {"items": [{"id": 7, "name": "Ada"}]}

    status, _, body = await post(gateway, "/api/v2/users", json.dumps({"full_name": "Bob", "email": "b@x"}))
    assert status == 201
    assert json.loads(body) == {"full_name": "Bob", "email": "b@x", "id": 7, "created_at": "2026-01-01"}
    assert "X-Client-Version" not in upstream.last["headers"]

    status, _, body = await post(gateway, "/api/users", json.dumps({"name": "Eve", "mail": "e@x"}))
    assert status == 422, "the default version (2) gets no v1 mapping"


# --- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize("rule, error", [
    ('set_headers = { X-A = "{nope}" }', "request[0].set_headers: '{nope}': unknown reference {nope}"),
    ('set_headers = { X-A = "{header}" }', "unknown reference {header}"),
    ('set_headers = { X-A = "{match.1}" }', "{match.N} is only available in path_replace"),
    ('set_headers = { X-A = "a}" }', "a lone '}'"),
    ('set_headers = { Content-Length = "1" }', "'Content-Length' is managed by the gateway"),
    ('set_headers = { "X A" = "1" }', "'X A' is not a header name"),
    ('set_headers = { X-A = "a\\r\\nX-B: 1" }', "has a control character"),
    ("path_pattern = '('\npath_replace = \"/x\"", "request[0].path_pattern: '(' is not a regular expression"),
    ("path_pattern = '^/a$'", "path_pattern and path_replace go together"),
    ("path_pattern = '^/(a)$'\npath_replace = \"/{match.2}\"", "{match.2}: path_pattern has no such group"),
    ("path_pattern = '^/(a)$'\npath_replace = \"x/{match.1}\"", "is not a valid path"),
    ('rename_body = { "items.*.a" = "b" }', "both must be the same up to the last *"),
    ('remove_body = ["a..b"]', "is not a dotted field path"),
    ('set_body = { "items.*" = 1 }', "the last segment cannot be *"),
    ("set_body = { when = 2026-01-01 }", "date values cannot be put into JSON"),
])
def test_invalid_rules_are_reported_with_their_path(rule, error):
    text = 'upstreams = [{ name = "a", targets = [{ url = "http://127.0.0.1:1" }] }]\n' \
           'routes = [{ name = "r", prefix = "/", upstream = "a" }]\n[[plugins.transform.request]]\n' + rule
    with pytest.raises(ConfigErrors) as raised:
        load_plugins(config.loads(text))
    assert "plugins.transform." in str(raised.value)
    assert error in str(raised.value)


def test_response_rule_statuses_are_checked():
    text = 'upstreams = [{ name = "a", targets = [{ url = "http://127.0.0.1:1" }] }]\n' \
           'routes = [{ name = "r", prefix = "/", upstream = "a" }]\n[[plugins.transform.response]]\nset_status = 101\n'
    with pytest.raises(ConfigErrors, match=r"plugins.transform.response\[0\].set_status: must be between 200 and 599"):
        load_plugins(config.loads(text))
