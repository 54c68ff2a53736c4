"""The real pair: plugway-auth verifies JWTs (real keys, real signatures) and plugway-rbac
authorizes from the consumer it sets, on a real gateway in front of a recording upstream.
(plugins/rbac/tests use a stand-in identity plugin; this file is where both really meet.)"""

from __future__ import annotations

import asyncio
import json
from urllib.parse import unquote

import pytest

from gateway.testing import route_table

pytest.importorskip("plugway_rbac")

ADMIN_ROUTE = route_table("admin", rbac='rules = [{ path = "/admin/**", roles = ["admin"] }]')
RBAC = """
    [plugins.rbac.roles]
    viewer = { permissions = ["tasks:read"] }
    developer = { inherits = ["viewer"], permissions = ["tasks:write"] }
    admin = { inherits = ["developer"], permissions = ["*:*"] }
    [[plugins.rbac.rules]]
    path = "/public/**"
    public = true
    [[plugins.rbac.rules]]
    methods = ["GET"]
    path = "/api/tasks/**"
    require = ["tasks:read"]
    [[plugins.rbac.rules]]
    methods = ["POST"]
    path = "/api/tasks/**"
    require = ["tasks:write"]
    [[plugins.rbac.rules]]
    path = "/api/users/{id}/**"
    owner = { param = "id", unless = "users:admin" }
    [[plugins.rbac.rules]]
    path = "/api/teams/{team}/**"
    require = ["tasks:read"]
    owner = { param = "team", equals = "claims.team" }
"""


@pytest.fixture
async def gateway(plugway_gateway, auth_config, rs256_plugin):
    return await plugway_gateway(auth_config(rs256_plugin(), routes=ADMIN_ROUTE, extra="[plugins.rbac]\n" + RBAC))


@pytest.fixture
def token(keys, sign):
    """``token(sub, *roles, **claims)``: an RS256 token the gateway's issuer signed."""
    return lambda sub, *roles, **claims: sign(keys.rsa, "RS256", sub=sub, roles=list(roles), **claims)


async def request(gateway, method: str, path: str, token: str | None = None, **headers: str) -> tuple[int, dict]:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with gateway.client.request(method, path, headers=headers) as response:
        return response.status, json.loads(await response.read() or b"{}")


async def test_roles_and_claims_from_the_token_decide_permissions_and_ownership(gateway, token, upstream):
    viewer, developer, root = token("alice", "viewer"), token("bob", "developer"), token("root", "admin")
    assert (await request(gateway, "GET", "/api/tasks/1", viewer))[0] == 200
    assert upstream.requests[-1]["headers"]["X-Consumer-ID"] == "alice"
    status, body = await request(gateway, "POST", "/api/tasks", viewer)
    assert (status, body["error"]["message"]) == (403, "this request requires the permission tasks:write")
    assert (await request(gateway, "POST", "/api/tasks", developer))[0] == 200  # developer inherits viewer, adds write
    assert (await request(gateway, "POST", "/api/tasks", token("carol", "viewer", scope="tasks:write")))[0] == 403
    assert (await request(gateway, "GET", "/api/users/alice/profile", viewer))[0] == 200  # her own
    status, body = await request(gateway, "GET", "/api/users/bob/profile", viewer)
    assert (status, body["error"]["message"]) == (403, "only the owner may do this without the permission users:admin")
    assert (await request(gateway, "GET", "/api/users/bob/profile", root))[0] == 200  # *:* holds users:admin
    assert (await request(gateway, "GET", "/api/teams/42/notes", token("dan", "viewer", team=42)))[0] == 200
    assert (await request(gateway, "GET", "/api/teams/7/notes", token("dan", "viewer", team=42)))[0] == 403
    assert (await request(gateway, "GET", "/api/teams/42/notes", token("dan", team=42)))[0] == 403  # no tasks:read
    status, body = await request(gateway, "GET", "/api/tasks/1")  # no token: auth answers before rbac
    assert (status, body["error"]["code"]) == (401, "missing_credentials")
    assert (await request(gateway, "GET", "/public/docs"))[0] == 200  # anonymous on the public rule
    assert [r["path"] for r in upstream.requests] == ["/api/tasks/1", "/api/tasks", "/api/users/alice/profile",
                                                      "/api/users/bob/profile", "/api/teams/42/notes", "/public/docs"]


async def test_roles_sent_by_the_client_or_spelled_otherwise_grant_nothing(gateway, token, upstream):
    viewer = token("alice", "viewer")
    for attempt in ({"X-Consumer-Roles": "admin"}, {"X-Consumer-ID": "root", "X-Consumer-Roles": "admin,developer"}):
        assert (await request(gateway, "POST", "/api/tasks", viewer, **attempt))[0] == 403
        assert (await request(gateway, "GET", "/admin/users", viewer, **attempt))[0] == 403
    for impostor in (token("admin", "viewer"), token("x", "Admin"), token("x", "admin ")):  # not the role admin
        assert (await request(gateway, "GET", "/admin/users", impostor))[0] == 403
    assert upstream.requests == []


async def raw_get(gateway, target: str, token: str | None) -> tuple[int, bytes]:
    """A request whose target goes out exactly as written (HTTP clients would normalise it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    writer.write(f"GET {target} HTTP/1.1\r\nHost: test\r\n{auth}Connection: close\r\n\r\n".encode())
    answer = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    return int(answer[9:12]), answer


# Spellings of the admin route's paths: the core makes each the canonical /admin... before
# routing, so they meet the admin-only rule ...
CANONICAL = ["/admin", "/admin/", "/admin/users", "//admin", "///admin/x", "/%61dmin", "/ad%6din/x", "/./admin",
             "/%2e/admin", "/admin/.", "/admin/x/..", "/api/../admin", "/public/../admin", "/public/%2e%2e/admin",
             "/api/tasks/../../admin/x", "/admin?role=admin", "http://test/admin"]
# ... or refuses them (400: encoded slashes, ';', double encoding, dots, backslashes, fragments),
# or finds no route for them (404: paths are case-sensitive).
ELSEWHERE = ["/ADMIN", "/Admin/users", "/%41dmin", "/admin;x", "/admin..;/", "/public/..;/admin", "/admin%3bx",
             "/admin%2f", "/admin%2Fusers", "/%2fadmin", "/public/%2e%2e%2fadmin", "/admin%252f", "/%2561dmin",
             "/admin%00", "/admin.", "/admin\\", "/public/..\\admin", "/admin#x", "/admin%20"]


async def test_path_tricks_never_take_a_non_admin_token_to_the_admin_route(gateway, token, upstream):
    viewer, root = token("alice", "viewer", "developer"), token("root", "admin")
    for target in CANONICAL:
        status, answer = await raw_get(gateway, target, viewer)
        assert status == 403 and b"this request requires the role admin" in answer, (target, answer[:300])
        assert (await raw_get(gateway, target, None))[0] == 401, target
    for target in ELSEWHERE:
        assert (await raw_get(gateway, target, viewer))[0] in (400, 404), target
    assert [r for r in upstream.requests if "admin" in unquote(r["path"]).lower()] == []
    assert upstream.requests == []
    # The same spellings with an admin token: the canonical ones do reach the route (so the 403s
    # above are the admin rule's), the others are refused or unrouted for everyone.
    for target in CANONICAL:
        assert (await raw_get(gateway, target, root))[0] == 200, target
    for target in ELSEWHERE:
        assert (await raw_get(gateway, target, root))[0] in (400, 404), target
    assert len(upstream.requests) == len(CANONICAL)
    assert all(r["path"].startswith("/admin") for r in upstream.requests)
