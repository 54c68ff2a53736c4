"""The RBAC plugin on a real gateway, against a real upstream, with a stand-in for the auth plugin.
(plugins/auth/tests/test_auth_rbac.py runs it with the real auth plugin and real JWTs: the
auth tests' fixtures make the keys and tokens.)"""

import asyncio
import json
import textwrap
from pathlib import Path

import pytest
from aiohttp import web

from gateway import config as gateway_config
from gateway.config.schema import ConfigErrors
from gateway.context import Consumer
from gateway.plugins import load_plugins
from gateway.testing import HeaderIdentity, proxy_config, route_table
from plugway_rbac.patterns import PathPattern

ROOT = Path(__file__).resolve().parents[3]

ROLES = """
    [plugins.rbac.roles]
    viewer = { permissions = ["tasks:read"] }
    developer = { inherits = ["viewer"], permissions = ["tasks:write"] }
    lead = { inherits = ["developer"], permissions = ["tasks:*"] }
    manager = { inherits = ["lead"], permissions = ["projects:*"] }
    admin = { inherits = ["manager"], permissions = ["*:*"] }
    auditor = { permissions = ["*:read"] }
"""


class Upstream:
    """Answers 200 and remembers the paths it was asked for."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def handle(self, request):
        self.paths.append(request.raw_path)
        return web.Response(text="ok")


@pytest.fixture
async def upstream(aiohttp_raw_server):
    recorder = Upstream()
    server = await aiohttp_raw_server(recorder.handle)
    recorder.url = str(server.make_url("")).rstrip("/")
    return recorder


async def start(plugway_gateway, upstream, rbac: str, routes: str = "", roles: str = ROLES):
    plugins = f"[plugins.identity]\n[plugins.rbac]\n{textwrap.dedent(rbac)}\n{textwrap.dedent(roles)}"
    return await plugway_gateway(proxy_config(upstream.url, routes=routes, plugins=plugins),
                                 plugins={"identity": HeaderIdentity()})


def who(user: str | None = None, roles: str = "", scopes: str = "", claims: dict | None = None) -> dict[str, str]:
    if user is None:
        return {}
    headers = {"X-Test-User": user, "X-Test-Roles": roles, "X-Test-Scopes": scopes}
    if claims is not None:
        headers["X-Test-Claims"] = json.dumps(claims)
    return headers


async def status(gateway, method: str, path: str, headers: dict[str, str]) -> int:
    async with gateway.client.request(method, path, headers=headers) as response:
        return response.status


async def answer(gateway, method: str, path: str, headers: dict[str, str]) -> tuple[int, dict, dict]:
    async with gateway.client.request(method, path, headers=headers) as response:
        return response.status, dict(response.headers), await response.json()


TASK_RULES = """
    rules = [
        { methods = ["GET"], path = "/api/tasks/**", require = ["tasks:read"] },
        { methods = ["POST"], path = "/api/tasks/**", require = ["tasks:write"] },
        { methods = ["DELETE"], path = "/api/tasks/*", require = ["tasks:delete"] },
        { methods = ["GET"], path = "/api/projects/**", require = ["projects:read"] },
    ]
"""


async def test_roles_inherit_the_permissions_of_the_roles_below_them(plugway_gateway, upstream):
    gateway = await start(plugway_gateway, upstream, TASK_RULES)
    expected = {  # (GET, POST, DELETE) on tasks, then GET on projects
        "viewer": [200, 403, 403, 403],
        "developer": [200, 200, 403, 403],
        "lead": [200, 200, 200, 403],
        "manager": [200, 200, 200, 200],
        "admin": [200, 200, 200, 200],
    }
    for role, statuses in expected.items():
        headers = who("u", role)
        got = [await status(gateway, "GET", "/api/tasks/1", headers),
               await status(gateway, "POST", "/api/tasks", headers),
               await status(gateway, "DELETE", "/api/tasks/1", headers),
               await status(gateway, "GET", "/api/projects/7", headers)]
        assert got == statuses, role


async def test_wildcards_grant_every_action_of_a_resource_or_an_action_on_every_resource(plugway_gateway, upstream):
    gateway = await start(plugway_gateway, upstream, TASK_RULES)
    lead, auditor = who("l", "lead"), who("a", "auditor")
    assert await status(gateway, "DELETE", "/api/tasks/1", lead) == 200  # tasks:* covers tasks:delete
    assert await status(gateway, "GET", "/api/projects/1", lead) == 403  # ... and nothing of projects
    assert await status(gateway, "GET", "/api/tasks/1", auditor) == 200  # *:read covers tasks:read
    assert await status(gateway, "GET", "/api/projects/1", auditor) == 200
    assert await status(gateway, "POST", "/api/tasks", auditor) == 403
    assert await status(gateway, "GET", "/api/tasks/1", who("x", "viewer,auditor,unknown-role")) == 200


async def test_scopes_count_as_permissions_only_where_configured(plugway_gateway, upstream):
    routes = route_table("scoped", rbac="""
        scopes_as_permissions = true
        rules = [{ path = "/scoped/tasks/**", require = ["tasks:read"] }]
    """)
    rules = '[[plugins.rbac.rules]]\npath = "/api/tasks/**"\nrequire = ["tasks:read"]\n'
    gateway = await start(plugway_gateway, upstream, rules, routes)
    token = who("app", scopes="openid tasks:read")
    assert await status(gateway, "GET", "/scoped/tasks/1", token) == 200
    assert await status(gateway, "GET", "/api/tasks/1", token) == 403
    code, headers, _ = await answer(gateway, "GET", "/scoped/tasks/1", who("app", scopes="tasks:*"))
    assert code == 403  # a scope is compared exactly, never expanded like a role's wildcard
    assert headers["WWW-Authenticate"] == 'Bearer error="insufficient_scope", scope="tasks:read"'


async def test_a_request_no_rule_matches_is_denied_unless_default_is_allow(plugway_gateway, upstream):
    routes = route_table("open", rbac='default = "allow"') + route_table("norules", rbac="rules = []")
    gateway = await start(plugway_gateway, upstream, TASK_RULES, routes)
    admin = who("root", "admin")
    code, _, body = await answer(gateway, "PUT", "/api/tasks/1", admin)  # rules exist, none for PUT
    assert (code, body["error"]["code"]) == (403, "no_matching_rule")
    code, _, body = await answer(gateway, "GET", "/api/elsewhere", admin)
    assert (code, body["error"]["code"]) == (403, "no_matching_rule")
    code, _, body = await answer(gateway, "GET", "/norules/x", admin)  # a route with no rules at all
    assert (code, body["error"]["code"]) == (403, "no_matching_rule")
    assert await status(gateway, "GET", "/open/anything", {}) == 200  # default = "allow", even anonymous
    assert await status(gateway, "POST", "/open/tasks/1", who("v", "viewer")) == 200
    assert upstream.paths == ["/open/anything", "/open/tasks/1"]


OWNER_RULES = """
    [[plugins.rbac.rules]]
    path = "/api/users/{id}/**"
    owner = { param = "id", unless = "users:admin" }
    [[plugins.rbac.rules]]
    path = "/api/teams/{team}/notes"
    require = ["tasks:read"]
    owner = { param = "team", equals = "claims.team" }
"""
OWNER_ROLES = ROLES + 'support = { permissions = ["users:admin"] }\n'


async def test_ownership_with_and_without_the_admin_override(plugway_gateway, upstream):
    gateway = await start(plugway_gateway, upstream, OWNER_RULES, roles=OWNER_ROLES)
    alice = who("alice")
    assert await status(gateway, "GET", "/api/users/alice", alice) == 200
    assert await status(gateway, "PUT", "/api/users/alice/settings", alice) == 200
    code, _, body = await answer(gateway, "GET", "/api/users/bob", alice)
    assert (code, body["error"]["code"]) == (403, "forbidden")
    assert body["error"]["message"] == "only the owner may do this without the permission users:admin"
    assert await status(gateway, "GET", "/api/users/bob", who("carol", "support")) == 200  # the override
    assert await status(gateway, "GET", "/api/users/bob", who("root", "admin")) == 200  # *:* covers users:admin
    assert await status(gateway, "GET", "/api/users/bob", who("m", "manager")) == 403
    assert await status(gateway, "GET", "/api/users/a%20b", who("a b")) == 200  # compared decoded
    assert await status(gateway, "GET", "/api/users/a%20b", who("a%20b")) == 403
    assert await status(gateway, "GET", "/api/users/al%69ce", alice) == 200  # canonical: /api/users/alice


async def test_ownership_against_a_claim(plugway_gateway, upstream):
    gateway = await start(plugway_gateway, upstream, OWNER_RULES, roles=OWNER_ROLES)
    assert await status(gateway, "GET", "/api/teams/42/notes", who("u", "viewer", claims={"team": 42})) == 200
    assert await status(gateway, "GET", "/api/teams/42/notes", who("u", "viewer", claims={"team": "7"})) == 403
    cafe = who("u", "viewer", claims={"team": "café"})
    assert await status(gateway, "GET", "/api/teams/caf%C3%A9/notes", cafe) == 200
    assert await status(gateway, "GET", "/api/teams/42/notes", who("u", "viewer", claims={})) == 403
    assert await status(gateway, "GET", "/api/teams/42/notes", who("42", "viewer")) == 403  # not the id
    assert await status(gateway, "GET", "/api/teams/42/notes", who("u", claims={"team": 42})) == 403  # no tasks:read


async def test_401_without_a_consumer_403_without_the_permission_and_the_error_body(plugway_gateway, upstream):
    gateway = await start(plugway_gateway, upstream, TASK_RULES)
    code, headers, body = await answer(gateway, "POST", "/api/tasks", {})
    assert code == 401
    assert headers["WWW-Authenticate"] == "Bearer"  # RFC 6750: no error attribute without credentials
    assert (body["error"]["code"], body["error"]["message"]) == ("missing_credentials", "credentials are required")
    assert body["error"]["request_id"] == headers["X-Request-ID"]
    code, headers, body = await answer(gateway, "POST", "/api/tasks", who("v", "viewer,secret-team"))
    assert code == 403
    assert "WWW-Authenticate" not in headers
    assert body["error"]["code"] == "forbidden"
    assert body["error"]["message"] == "this request requires the permission tasks:write"
    assert "viewer" not in json.dumps(body) and "secret-team" not in json.dumps(body)
    assert upstream.paths == []


async def raw_get(gateway, target: str, headers: dict[str, str]) -> bytes:
    """A request whose target goes out exactly as written (HTTP clients would normalise it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    lines = [f"GET {target} HTTP/1.1", "Host: test", "Connection: close"] + [f"{k}: {v}" for k, v in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    data = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    return data


TRICKS = ["/api/public/../admin", "/api/public/%2e%2e/admin/users", "/api/public/%2E%2E/admin", "//api/admin",
          "/api//admin", "/api/public/./../admin/", "/api/./admin/../admin/x", "/api/public/x/%2e%2e/%2e%2e/admin"]


async def test_path_tricks_cannot_reach_the_admin_only_route(plugway_gateway, upstream):
    routes = route_table("admin", "/api/admin", rbac='rules = [{ path = "/api/admin/**", roles = ["admin"] }]')
    rules = """
        [[plugins.rbac.rules]]
        path = "/api/public/**"
        public = true
        [[plugins.rbac.rules]]
        methods = ["GET"]
        path = "/**"
    """
    gateway = await start(plugway_gateway, upstream, rules, routes)
    for target in TRICKS:
        anonymous = await raw_get(gateway, target, {})
        assert anonymous.startswith(b"HTTP/1.1 401 ") and b'"code":"missing_credentials"' in anonymous, target
        viewer = await raw_get(gateway, target, who("v", "viewer"))
        assert viewer.startswith(b"HTTP/1.1 403 ") and b"requires the role admin" in viewer, target
    assert upstream.paths == []
    refused = await raw_get(gateway, "/api/public/..%2fadmin", who("v", "viewer"))
    assert refused.startswith(b"HTTP/1.1 400 ")  # an encoded slash never reaches a plugin
    for target in TRICKS:  # the same targets do reach the route for an admin, as canonical paths
        assert (await raw_get(gateway, target, who("root", "admin"))).startswith(b"HTTP/1.1 200 "), target
    assert all(path.startswith("/api/admin") for path in upstream.paths) and len(upstream.paths) == len(TRICKS)
    assert await status(gateway, "GET", "/api/public/x", {}) == 200


async def test_route_rules_replace_the_global_ones_and_keep_the_global_roles(plugway_gateway, upstream):
    routes = route_table("reports", rbac='rules = [{ path = "/reports/**", roles = ["lead"] }]')
    gateway = await start(plugway_gateway, upstream, TASK_RULES, routes)
    assert await status(gateway, "GET", "/reports/q1", who("d", "developer")) == 403
    assert await status(gateway, "GET", "/reports/q1", who("l", "lead")) == 200
    assert await status(gateway, "GET", "/reports/q1", who("root", "admin")) == 200  # admin inherits lead
    assert await status(gateway, "GET", "/api/tasks/1", who("d", "developer")) == 200  # the global rules, still
    assert await status(gateway, "GET", "/reports/../api/tasks/1", who("d", "developer")) == 200


async def test_first_match_wins_and_head_follows_get(plugway_gateway, upstream):
    rules = """
        [[plugins.rbac.rules]]
        path = "/api/tasks/archive"
        require = ["tasks:archive"]
        [[plugins.rbac.rules]]
        methods = ["GET"]
        path = "/api/tasks/**"
        require = ["tasks:read"]
    """
    gateway = await start(plugway_gateway, upstream, rules)
    viewer = who("v", "viewer")
    assert await status(gateway, "HEAD", "/api/tasks/1", viewer) == 200
    assert await status(gateway, "GET", "/api/tasks/archive", viewer) == 403  # the first rule decides
    assert await status(gateway, "GET", "/api/tasks/archive/", viewer) == 403  # with a trailing slash too
    assert await status(gateway, "GET", "/api/tasks/archive", who("l", "lead")) == 200
    assert await status(gateway, "OPTIONS", "/api/tasks/1", viewer) == 403


async def test_decisions_are_counted_by_route_and_result(plugway_gateway, upstream):
    gateway = await start(plugway_gateway, upstream, TASK_RULES)
    await status(gateway, "GET", "/api/tasks/1", who("v", "viewer"))
    await status(gateway, "GET", "/api/tasks/2", who("v", "viewer"))
    await status(gateway, "POST", "/api/tasks/1", who("v", "viewer"))
    await status(gateway, "POST", "/api/tasks/1", {})
    await status(gateway, "PATCH", "/api/tasks/1", who("v", "viewer"))
    results = {result: gateway.metric("plugway_rbac_decisions_total", route="api", result=result)
               for result in ("allowed", "forbidden", "unauthenticated", "no_matching_rule")}
    assert results == {"allowed": 2.0, "forbidden": 1.0, "unauthenticated": 1.0, "no_matching_rule": 1.0}


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigErrors) as caught:
        load_plugins(gateway_config.loads(textwrap.dedent(text)))
    return [str(error) for error in caught.value.errors]


BASE = proxy_config("http://127.0.0.1:9")


def test_roles_are_checked_at_parse_time():
    found = problems(BASE + """
        [plugins.rbac.roles]
        a = { inherits = ["b"], permissions = ["tasks:read", "tasks", "a:b:c"] }
        b = { inherits = ["a"] }
        c = { inherits = ["nobody"] }
    """)
    assert "plugins.rbac.roles.a.permissions[1]: 'tasks' is not a permission" in found[0]
    assert "plugins.rbac.roles.a.permissions[2]: 'a:b:c' is not a permission" in found[1]
    found = problems(BASE + '[plugins.rbac.roles]\na = { inherits = ["b"] }\nb = { inherits = ["a"] }\n'
                     'c = { inherits = ["nobody"] }\n')
    assert found == ["plugins.rbac.roles.c.inherits[0]: unknown role 'nobody' (roles: a, b, c)"]
    found = problems(BASE + '[plugins.rbac.roles]\na = { inherits = ["b"] }\nb = { inherits = ["c"] }\n'
                     'c = { inherits = ["a"] }\nd = { inherits = ["d"] }\n')
    assert found == ["plugins.rbac.roles.a.inherits: inheritance cycle: a -> b -> c -> a",
                     "plugins.rbac.roles.d.inherits: inheritance cycle: d -> d"]


def test_rules_are_checked_at_parse_time():
    found = problems(BASE + """
        [plugins.rbac.roles]
        viewer = { permissions = ["tasks:read"] }
        [[plugins.rbac.rules]]
        path = "/api/users/{id}"
        methods = ["get"]
        require = ["tasks:*"]
        owner = { param = "user" }
        [[plugins.rbac.rules]]
        path = "api/x"
        [[plugins.rbac.rules]]
        path = "/api/%41/x*"
        [[plugins.rbac.rules]]
        path = "/api/public/**"
        public = true
        roles = ["viewer"]
        [[plugins.rbac.rules]]
        path = "/api/x"
        owner = { param = "id", equals = "token.sub", unless = "users" }
        [[plugins.rbac.rules]]
        path = "/api/**/x/**"
    """)
    assert found == [
        "plugins.rbac.rules[0].methods[0]: 'get' is not an upper-case HTTP method",
        "plugins.rbac.rules[0].require[0]: 'tasks:*': a rule requires concrete permissions; "
        "wildcards belong in roles' permissions",
        "plugins.rbac.rules[0].owner.param: 'user' is not a placeholder of '/api/users/{id}' (placeholders: {id})",
        "plugins.rbac.rules[1].path: 'api/x' must start with /",
        "plugins.rbac.rules[2].path: '/api/%41/x*': the segment '%41' must be *, **, {name} or plain characters "
        "(no percent-escape, *, {, }, ; or whitespace inside a segment)",
        "plugins.rbac.rules[3].public: a public rule cannot also require permissions, roles or ownership",
        "plugins.rbac.rules[4].owner.equals: must be \"consumer.id\" or \"claims.NAME\", not 'token.sub'",
        "plugins.rbac.rules[4].owner.unless: 'users' is not a permission: write \"resource:action\" "
        "(letters, digits, _ . -)",
        "plugins.rbac.rules[5].path: '/api/**/x/**' has ** twice; a pattern may have one",
    ]


def test_references_in_rules_are_checked_against_the_roles():
    other = route_table("other", rbac='rules = [{ path = "/other/**", require = ["taks:read"] }]')
    found = problems(BASE + other + """
        [plugins.rbac.roles]
        viewer = { permissions = ["tasks:read"] }
        [[plugins.rbac.rules]]
        path = "/api/**"
        roles = ["ghost"]
    """)
    assert found == [
        "plugins.rbac.rules[0].roles[0]: unknown role 'ghost' (roles: viewer)",
        "routes[1].plugins.rbac.rules[0].require[0]: no role grants 'taks:read' (a typo? scopes_as_permissions "
        "is false)",
    ]


@pytest.mark.parametrize("pattern, path, matches", [
    ("/api/tasks/**", "/api/tasks", True),
    ("/api/tasks/**", "/api/tasks/", True),
    ("/api/tasks/**", "/api/tasks/1/notes/", True),
    ("/api/tasks/**", "/api/tasksX", False),
    ("/api/tasks/**", "/api", False),
    ("/api/*/notes", "/api/1/notes", True),
    ("/api/*/notes", "/api/notes", False),
    ("/api/*/notes", "/api/1/2/notes", False),
    ("/api/**/notes", "/api/notes", True),
    ("/api/**/notes", "/api/1/2/notes/", True),
    ("/api/**/notes", "/api/1/2/notesX", False),
    ("/admin", "/admin", True),
    ("/admin", "/admin/", True),
    ("/admin", "/admin/x", False),
    ("/admin/", "/admin", False),
    ("/admin/", "/admin/", True),
    ("/", "/", True),
    ("/", "/x", False),
    ("/**", "/", True),
    ("/**", "/any/thing", True),
    ("/api/x.json", "/api/xXjson", False),
    ("/users/{id}", "/users/caf%C3%A9", True),
    ("/users/{id}", "/users/", False),
])
def test_path_patterns(pattern, path, matches):
    assert (PathPattern.parse(pattern).match(path) is not None) is matches


def test_the_example_configuration_decides_as_its_comments_say():
    plugins = load_plugins(gateway_config.load(ROOT / "conf" / "examples" / "rbac.toml"))
    rbac = plugins.get("rbac")
    assert "health" not in rbac.route_settings
    api, admin = rbac.route_settings["api"].policy, rbac.route_settings["admin"].policy
    viewer, developer, lead, admin_user = (Consumer("u1", roles=(role,)) for role in
                                           ("viewer", "developer", "lead", "admin"))
    decisions = [
        api.decide("GET", "/api/public/docs", None).result,
        api.decide("GET", "/api/tasks/1", None).result,
        api.decide("GET", "/api/tasks/1", viewer).result,
        api.decide("POST", "/api/tasks", viewer).result,
        api.decide("POST", "/api/tasks", developer).result,
        api.decide("DELETE", "/api/tasks/1", developer).result,
        api.decide("DELETE", "/api/tasks/1", lead).result,
        api.decide("GET", "/api/reports/q1", Consumer("u1", scopes=("reports:read",))).result,
        api.decide("GET", "/api/reports/q1", lead).result,
        api.decide("GET", "/api/tasks/1", Consumer("app", scopes=("tasks:read",))).result,
        api.decide("GET", "/api/users/u1", viewer).result,
        api.decide("GET", "/api/users/u2", viewer).result,
        api.decide("GET", "/api/users/u2", admin_user).result,
        api.decide("GET", "/api/unknown", admin_user).result,
        admin.decide("GET", "/admin/x", lead).result,
        admin.decide("GET", "/admin/x", admin_user).result,
    ]
    assert decisions == [
        "allowed", "unauthenticated", "allowed", "forbidden", "allowed", "forbidden", "allowed", "forbidden",
        "allowed", "allowed", "allowed", "not_owner", "allowed", "no_matching_rule", "forbidden", "allowed",
    ]
