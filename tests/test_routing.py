import pytest

from gateway.config.model import RouteSettings
from gateway.errors import MethodNotAllowed, RouteNotFound
from gateway.routing import Router, compile_route, request_host


def router(*routes: dict) -> Router:
    return Router([compile_route(RouteSettings(upstream="u", **route), i) for i, route in enumerate(routes)])


def test_prefixes_are_segment_aware():
    table = router({"name": "users", "prefix": "/api/users"}, {"name": "root", "prefix": "/"})
    assert table.match("", "/api/users", "GET")[0].name == "users"
    assert table.match("", "/api/users/7", "GET")[0].name == "users"
    assert table.match("", "/api/usersX", "GET")[0].name == "root"
    assert table.match("", "/api/user", "GET")[0].name == "root"


def test_the_longest_prefix_wins_whatever_the_order():
    table = router({"name": "api", "prefix": "/api"}, {"name": "admin", "prefix": "/api/admin"})
    assert table.match("", "/api/admin/x", "GET")[0].name == "admin"
    assert table.match("", "/api/x", "GET")[0].name == "api"


def test_templates_capture_decoded_segments():
    table = router({"name": "user", "path": "/users/{id}/posts/{post}"})
    route, params = table.match("", "/users/caf%C3%A9/posts/3", "GET")
    assert route.name == "user"
    assert params == {"id": "café", "post": "3"}
    with pytest.raises(RouteNotFound):
        table.match("", "/users/1/posts", "GET")
    with pytest.raises(RouteNotFound):
        table.match("", "/users/1/posts/2/x", "GET")


def test_wrong_method_is_405_with_allow_from_every_matching_route():
    table = router({"name": "read", "prefix": "/t", "methods": ["GET"]}, {"name": "write", "prefix": "/t", "methods": ["POST"]})
    assert table.match("", "/t", "POST")[0].name == "write"
    assert table.match("", "/t", "HEAD")[0].name == "read"
    with pytest.raises(MethodNotAllowed) as caught:
        table.match("", "/t/x", "DELETE")
    assert dict(caught.value.headers)["Allow"] == "GET, HEAD, POST"


def test_hosts_exact_and_wildcard_before_any_host():
    table = router(
        {"name": "any", "prefix": "/"},
        {"name": "wild", "prefix": "/", "hosts": ["*.example.com"]},
        {"name": "exact", "prefix": "/", "hosts": ["api.example.com"]},
    )
    assert table.match("api.example.com", "/", "GET")[0].name == "exact"
    assert table.match("www.example.com", "/", "GET")[0].name == "wild"
    assert table.match("a.b.example.com", "/", "GET")[0].name == "any"
    assert table.match("example.com", "/", "GET")[0].name == "any"


@pytest.mark.parametrize("header, host", [
    ("API.Example.com:8080", "api.example.com"), ("api.example.com.", "api.example.com"), ("[::1]:80", "[::1]"),
    (None, ""),
])
def test_request_host_is_normalised(header, host):
    assert request_host(header) == host


def test_strip_prefix():
    route = compile_route(RouteSettings(name="r", upstream="u", prefix="/api/users", strip_prefix=True), 0)
    assert route.upstream_path("/api/users") == "/"
    assert route.upstream_path("/api/users/7") == "/7"
    assert route.upstream_path("/api/users/") == "/"
