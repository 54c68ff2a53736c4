import pytest

from gateway.paths import BadPath, canonical_path, template_error


@pytest.mark.parametrize("raw, canonical", [
    ("/api/echo/caf%C3%A9/a%20b", "/api/echo/caf%C3%A9/a%20b"),  # other escapes stay byte for byte
    ("/public/../admin", "/admin"),
    ("/public/%2e%2e/admin", "/admin"),
    ("/public/%2E%2E/admin", "/admin"),
    ("/public/.%2e/admin", "/admin"),
    ("//admin", "/admin"),
    ("/admin//x", "/admin/x"),
    ("/%61dmin", "/admin"),
    ("/a/./b/.", "/a/b/"),
    ("/a/b/..", "/a/"),
    ("/a/b/", "/a/b/"),
    ("/", "/"),
    ("/a%7E%2D%5F", "/a~-_"),
    ("/x%3Fy", "/x%3Fy"),
])
def test_canonical_forms(raw, canonical):
    assert canonical_path(raw) == canonical


@pytest.mark.parametrize("raw, reason", [
    ("/admin%2fsecret", "encoded slash"),
    ("/public%2f..%2fadmin", "encoded slash"),
    ("/a%5Cb", "encoded slash or backslash"),
    ("/public\\..\\admin", "backslash"),
    ("/admin%00", "control character"),
    ("/admin%0d%0a", "control character"),
    ("/a%C0%AF", "not valid UTF-8"),
    ("/public/%252e%252e/admin", "double-encoded"),
    ("/a%252Fb", "double-encoded"),
    ("/a%25%32e", "double-encoded"),  # found by scripts/fuzz: becomes %252e once %32 is decoded
    ("/admin;x=y", "';'"),
    ("/public/..;/admin", "';'"),
    ("/..", "climbs above the root"),
    ("/a/../../b", "climbs above the root"),
    ("/a%zz", "malformed"),
    ("/a%2", "malformed"),
    ("/admin#frag", "fragment"),
    ("/caf\u00e9", "percent-encoded"),
    ("admin", "must start with /"),
])
def test_ambiguous_paths_are_refused(raw, reason):
    with pytest.raises(BadPath) as caught:
        canonical_path(raw)
    assert reason in caught.value.reason


def test_a_route_may_keep_encoded_slashes_and_semicolons():
    assert canonical_path("/files/a%2Fb", keep_encoded_slash=True) == "/files/a%2Fb"
    assert canonical_path("/m;v=1", allow_semicolon=True) == "/m;v=1"


@pytest.mark.parametrize("template, problem", [
    ("/users/{id}", None),
    ("/users/{id}/posts/{post}", None),
    ("/users/{id}{x}", "whole segment"),
    ("/users/{id}/{id}", "used twice"),
])
def test_templates(template, problem):
    error = template_error(template)
    assert (error is None) if problem is None else (problem in error)


# --- properties (hypothesis) --------------------------------------------------------------------

import posixpath  # noqa: E402
from urllib.parse import unquote  # noqa: E402

from hypothesis import given, settings, strategies as st  # noqa: E402

from gateway.config.model import RouteSettings  # noqa: E402
from gateway.routing import Router, compile_route  # noqa: E402

PIECES = ["public", "admin", "..", ".", "", "%2e", "%2E%2e", ".%2e", "%2f", "%2F", "%5c", "%252e", "%25", "%2541",
          "a%20b", "%61dmin", "%00", "%0a", ";x", "\\", "caf%C3%A9", "%C0%AF", "~", "%7E", "x", "%", "%zz", "#"]
segments = st.lists(st.one_of(st.sampled_from(PIECES), st.text("abc.%2eEf;/\\~_-", max_size=6)), max_size=8)
raw_paths = segments.map(lambda parts: "/" + "/".join(parts))


def canonical_or_none(path):
    try:
        return canonical_path(path)
    except BadPath:
        return None


@settings(max_examples=3000, deadline=None)
@given(raw_paths)
def test_canonicalisation_is_idempotent(path):
    canonical = canonical_or_none(path)
    if canonical is not None:
        assert canonical_path(canonical) == canonical


@settings(max_examples=3000, deadline=None)
@given(raw_paths)
def test_canonical_paths_hold_nothing_ambiguous(path):
    canonical = canonical_or_none(path)
    if canonical is None:
        return
    segments_out = canonical.split("/")[1:]
    assert "." not in segments_out and ".." not in segments_out
    assert "//" not in canonical
    lowered = canonical.lower()
    assert "%2f" not in lowered and "%5c" not in lowered and "\\" not in canonical and "%25" + "2e" not in lowered
    assert all("\x21" <= char <= "\x7e" for char in canonical)
    assert "%00" not in canonical and "%0a" not in lowered and "%0d" not in lowered


ROUTER = Router([
    compile_route(RouteSettings(name="public", upstream="u", prefix="/public", strip_prefix=True), 0),
    compile_route(RouteSettings(name="admin", upstream="u", prefix="/admin"), 1),
    compile_route(RouteSettings(name="root", upstream="u", prefix="/"), 2),
])


@settings(max_examples=3000, deadline=None)
@given(raw_paths)
def test_no_encoding_lets_a_path_leave_its_route(path):
    """Whatever the encoding, the route that serves a request is the one its decoded,
    normalised path belongs to, and an upstream that decodes and normalises the forwarded path
    again (as many do) still finds it under the same route."""
    canonical = canonical_or_none(path)
    if canonical is None:
        return
    route, _ = ROUTER.match("", canonical, "GET")
    fully_decoded = posixpath.normpath(unquote(canonical))
    expected = next(name for name, prefix in (("public", "/public"), ("admin", "/admin"), ("root", "/"))
                    if fully_decoded == prefix or fully_decoded.startswith(prefix.rstrip("/") + "/"))
    assert route.name == expected, (path, canonical, fully_decoded)
    if route.name == "public":
        forwarded = route.upstream_path(canonical)  # strip_prefix
        seen_by_upstream = posixpath.normpath(unquote(forwarded))
        assert seen_by_upstream == (fully_decoded[len("/public"):] or "/"), (path, forwarded)
