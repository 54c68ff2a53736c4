"""The handshake goes through auth and rate limiting like any request (the real plugins)."""

from __future__ import annotations

import secrets
import time

import jwt
import pytest

ISSUER = "https://idp.example.test/"


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "hmac.secret"
    path.write_text(secrets.token_urlsafe(48))
    return path


def token(secret_file, **claims) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "sub": "alice", "iat": now, "exp": now + 300, "jti": secrets.token_hex(8)}
    payload.update(claims)
    return jwt.encode(payload, secret_file.read_text().strip(), algorithm="HS256")


def auth_plugins(secret_file, extra: str = "") -> str:
    return f"""
        [plugins.auth]
        token_sources = ["bearer", "cookie:session", "query:access_token", "subprotocol"]
        hide_credentials = true
        [[plugins.auth.issuers]]
        name = "test"
        issuer = "{ISSUER}"
        algorithms = ["HS256"]
        [[plugins.auth.issuers.hmac_keys]]
        secret = {{ file = "{secret_file}" }}
        {extra}
    """


async def test_the_token_may_come_from_a_header_cookie_query_or_subprotocol(plugway_gateway, ws_upstream, ws_config,
                                                                         ws_connect, ws_url, refused, secret_file):
    gateway = await plugway_gateway(ws_config(ws_upstream.base, extra=auth_plugins(secret_file)))
    url = ws_url(gateway, "/ws/echo")
    good = token(secret_file)
    for options, path in (
        ({"additional_headers": {"Authorization": f"Bearer {good}"}}, "/ws/echo"),
        ({"additional_headers": {"Cookie": f"theme=dark; session={good}"}}, "/ws/echo"),
        ({}, f"/ws/echo?room=7&access_token={good}"),
        ({"subprotocols": [f"bearer.{good}", "chat.v2"]}, "/ws/echo"),
    ):
        async with ws_connect(ws_url(gateway, path), **options) as ws:
            await ws.send("authenticated")
            assert await ws.recv() == "authenticated"
    cookie, query, subprotocol = ws_upstream.record.handshakes[1:]
    assert cookie["headers"]["Cookie"] == "theme=dark"  # hide_credentials: the token stays at the gateway
    assert query["path"] == "/echo?room=7"
    assert subprotocol["headers"]["Sec-WebSocket-Protocol"] == "chat.v2"  # the token entry never goes upstream
    assert subprotocol["protocol"] == "chat.v2"
    assert all(seen["headers"]["X-Consumer-ID"] == "alice" for seen in ws_upstream.record.handshakes)
    status, body = await refused(ws_connect, url)
    assert (status, body["error"]["code"]) == (401, "missing_credentials")
    assert len(ws_upstream.record.handshakes) == 4
    assert gateway.metric("plugway_websocket_handshake_refusals_total", route="ws", reason="missing_credentials") == 1


async def test_a_revoked_token_cannot_open_a_websocket(plugway_gateway, ws_upstream, ws_config, ws_connect, ws_url,
                                                       refused, secret_file):
    gateway = await plugway_gateway(ws_config(ws_upstream.base, extra=auth_plugins(secret_file)))
    url = ws_url(gateway, "/ws/echo")
    revoked = token(secret_file, jti="to-revoke")
    headers = {"additional_headers": {"Authorization": f"Bearer {revoked}"}}
    async with ws_connect(url, **headers) as ws:
        await ws.send("before")
        assert await ws.recv() == "before"
    async with gateway.client.post(f"{gateway.admin_url}/auth/revocations",
                                   json={"jti": "to-revoke", "expires_at": time.time() + 300}) as response:
        assert response.status == 200
    deadline = time.monotonic() + 5
    while True:  # a revocation reaches every worker within half a second
        try:
            status, body = await refused(ws_connect, url, **headers)
            break
        except pytest.fail.Exception:
            assert time.monotonic() < deadline, "the revoked token still opens WebSockets"
    assert (status, body["error"]["code"]) == (401, "invalid_token")
    assert "revoked" in body["error"]["message"]


async def test_rate_limited_handshakes_get_429(plugway_gateway, ws_upstream, ws_config, ws_connect, ws_url, refused,
                                               secret_file):
    gateway = await plugway_gateway(ws_config(ws_upstream.base, extra=auth_plugins(secret_file) + """
        [plugins.ratelimit]
        limit = "2/m"
    """))
    headers = {"additional_headers": {"Authorization": f"Bearer {token(secret_file)}"}}
    for _ in range(2):
        async with ws_connect(ws_url(gateway, "/ws/echo"), **headers):
            pass
    status, body = await refused(ws_connect, ws_url(gateway, "/ws/echo"), **headers)
    assert (status, body["error"]["code"]) == (429, "rate_limited")
    assert len(ws_upstream.record.handshakes) == 2


async def test_rbac_refuses_a_handshake_whose_role_lacks_the_permission_with_403(plugway_gateway, ws_upstream,
                                                                                 ws_config, ws_connect, ws_url, refused,
                                                                                 secret_file):
    gateway = await plugway_gateway(ws_config(ws_upstream.base, extra=auth_plugins(secret_file) + """
        [plugins.rbac.roles]
        viewer = { permissions = ["chat:read"] }
        member = { inherits = ["viewer"], permissions = ["chat:write"] }
        [[plugins.rbac.rules]]
        methods = ["GET"]
        path = "/ws/**"
        require = ["chat:write"]
    """))
    url = ws_url(gateway, "/ws/echo")

    def bearer(role: str) -> dict:
        return {"additional_headers": {"Authorization": f"Bearer {token(secret_file, roles=[role])}"}}

    status, body = await refused(ws_connect, url, **bearer("viewer"))
    assert (status, body["error"]["code"]) == (403, "forbidden")  # an HTTP answer: never a 101
    assert "chat:write" in body["error"]["message"]
    assert ws_upstream.record.handshakes == []  # nothing was opened upstream either
    assert gateway.metric("plugway_websocket_connections", route="ws") == 0
    async with ws_connect(url, **bearer("member")) as ws:
        await ws.send("allowed")
        assert await ws.recv() == "allowed"
    assert [seen["headers"]["X-Consumer-Roles"] for seen in ws_upstream.record.handshakes] == ["member"]
    assert gateway.metric("plugway_rbac_decisions_total", route="ws", result="forbidden") == 1
    assert gateway.metric("plugway_websocket_handshake_refusals_total", route="ws", reason="forbidden") == 1
