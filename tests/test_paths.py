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
