"""API keys: made by `plugway apikey new`, configured as hashes, checked on a real gateway."""

from __future__ import annotations

import json
import subprocess

from gateway.testing import PLUGWAY


def new_key(*args: str) -> tuple[str, str]:
    """Run `plugway apikey new`; returns the key and the configuration block it printed."""
    result = subprocess.run([PLUGWAY, "apikey", "new", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    key = lines[1]
    block = "\n".join(lines[lines.index("[[plugins.auth.api_keys]]"):])
    assert key.startswith("pwk_") and len(key) > 40
    assert key not in block  # only the hash goes into the configuration
    return key, block


async def get(gateway, path: str = "/api/x", headers: dict | None = None):
    async with gateway.client.get(path, headers=headers) as response:
        return response.status, await response.read(), response.headers


async def test_a_key_from_the_command_authenticates_its_consumer(plugway_gateway, auth_config, upstream):
    key, block = new_key("--consumer", "billing", "--roles", "service,batch", "--scopes", "invoices:read")
    gateway = await plugway_gateway(auth_config("", extra=block))
    status, _, _ = await get(gateway, headers={"X-API-Key": key})
    assert status == 200
    seen = upstream.requests[-1]["headers"]
    assert (seen["X-Consumer-ID"], seen["X-Consumer-Roles"], seen["X-Consumer-Scopes"]) == (
        "billing", "service,batch", "invoices:read")
    status, body, headers = await get(gateway, headers={"X-API-Key": key[:-1] + ("A" if key[-1] != "A" else "B")})
    assert status == 401
    error = json.loads(body)["error"]
    assert error["code"] == "invalid_api_key" and error["message"] == "the API key is not valid"
    assert key[:-1] not in body.decode() and key[:-1] not in str(headers)
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]
    assert gateway.metric("plugway_auth_failures_total", reason="invalid_api_key") == 1


async def test_several_keys_per_consumer_allow_rotation(plugway_gateway, auth_config, upstream):
    old, old_block = new_key("--consumer", "billing")
    new, new_block = new_key("--consumer", "billing")
    gateway = await plugway_gateway(auth_config("", extra=old_block + "\n" + new_block))
    for key in (old, new):
        assert (await get(gateway, headers={"X-API-Key": key}))[0] == 200
        assert upstream.requests[-1]["headers"]["X-Consumer-ID"] == "billing"


async def test_an_expired_key_is_refused(plugway_gateway, auth_config):
    expired, expired_block = new_key("--consumer", "old", "--expires", "2020-01-01T00:00:00Z")
    valid, valid_block = new_key("--consumer", "new", "--expires", "2999-01-01T00:00:00+02:00")
    gateway = await plugway_gateway(auth_config("", extra=expired_block + "\n" + valid_block))
    status, body, _ = await get(gateway, headers={"X-API-Key": expired})
    assert status == 401 and json.loads(body)["error"]["message"] == "the API key has expired"
    assert (await get(gateway, headers={"X-API-Key": valid}))[0] == 200


async def test_keys_in_a_query_parameter_or_a_custom_header(plugway_gateway, auth_config, upstream):
    key, block = new_key("--consumer", "widget")
    gateway = await plugway_gateway(auth_config('api_key_header = "X-Consumer-Key"\napi_key_query = "api_key"\n'
                                                "hide_credentials = true", extra=block))
    assert (await get(gateway, path=f"/api/x?api_key={key}&page=2"))[0] == 200
    assert upstream.requests[-1]["path"] == "/api/x?page=2"
    assert (await get(gateway, headers={"X-Consumer-Key": key}))[0] == 200
    assert "X-Consumer-Key" not in upstream.requests[-1]["headers"]
    assert (await get(gateway, headers={"X-API-Key": key}))[0] == 401  # not a configured source here


async def test_a_key_and_a_token_together_are_refused(plugway_gateway, auth_config, rs256_plugin, keys, sign):
    key, block = new_key("--consumer", "billing")
    gateway = await plugway_gateway(auth_config(rs256_plugin(), extra=block))
    token = sign(keys.rsa, "RS256")
    assert (await get(gateway, headers={"X-API-Key": key}))[0] == 200
    assert (await get(gateway, headers={"Authorization": f"Bearer {token}"}))[0] == 200
    status, body, _ = await get(gateway, headers={"X-API-Key": key, "Authorization": f"Bearer {token}"})
    assert status == 401 and json.loads(body)["error"]["message"] == "more than one credential was sent"


def test_the_command_refuses_bad_names():
    for args in (["--consumer", "anonymous"], ["--consumer", 'a"b'], ["--consumer", "ok", "--roles", "a b"],
                 ["--consumer", "ok", "--expires", "tomorrow"]):
        result = subprocess.run([PLUGWAY, "apikey", "new", *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and "plugway apikey new" in result.stderr
