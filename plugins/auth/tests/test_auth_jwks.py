"""Keys from a real JWKS server (aiohttp) that rotates them mid-test: caching by Cache-Control,
refetching for an unknown kid at most once per interval, and an identity provider that fails."""

from __future__ import annotations

import asyncio
import json
import secrets
import time

import pytest


async def status_of(gateway, token: str) -> int:
    async with gateway.client.get("/api/x", headers={"Authorization": f"Bearer {token}"}) as response:
        await response.read()
        return response.status


async def eventually(condition, timeout: float = 10.0) -> float:
    """Poll an async condition; returns the seconds it took (fails the test past the timeout)."""
    started = time.monotonic()
    while not await condition():
        assert time.monotonic() - started < timeout, "condition not met in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def jwks_plugin(url: str, **settings: str) -> str:
    extra = "\n".join(f'{name} = "{value}"' for name, value in settings.items())
    return f"""
        [[plugins.auth.issuers]]
        name = "idp"
        issuer = "https://idp.example.test/"
        algorithms = ["RS256", "ES256"]
        jwks_url = "{url}"
        {extra}
    """


async def test_keys_come_from_the_jwks_url_and_rotate_mid_test(plugway_gateway, auth_config, jwks_server, keys, sign):
    jwks_server.keys = [keys.jwk(keys.rsa, "a", "RS256")]
    gateway = await plugway_gateway(auth_config(jwks_plugin(jwks_server.url, jwks_min_refresh="200ms")))
    token_a = sign(keys.rsa, "RS256", kid="a")
    assert await status_of(gateway, token_a) == 200
    assert jwks_server.fetches == 1
    # The identity provider rotates: key b (an EC key) replaces key a.
    jwks_server.keys = [keys.jwk(keys.ec256, "b", "ES256")]
    token_b = sign(keys.ec256, "ES256", kid="b")
    await eventually(lambda: _is(gateway, token_b, 200))  # an unknown kid fetches again (after 200 ms at most)
    assert jwks_server.fetches >= 2
    assert await status_of(gateway, token_a) == 401  # a is gone, even though it was verified (and cached) before
    assert gateway.metric("plugway_auth_failures_total", reason="unknown_key") >= 1
    assert gateway.metric("plugway_auth_jwks_fetches_total", issuer="idp", result="ok") == jwks_server.fetches


async def _is(gateway, token: str, status: int) -> bool:
    return await status_of(gateway, token) == status


def intervals_since(started: float, interval: float) -> int:
    """Whole intervals from ``started`` to now: the most fetches that can have begun since a
    fetch that began after ``started``, when fetches begin at least ``interval`` apart."""
    return int((time.monotonic() - started) / interval)


async def test_a_flood_of_unknown_kids_fetches_at_most_once_per_interval(plugway_gateway, auth_config, jwks_server,
                                                                         keys, sign):
    jwks_server.keys = [keys.jwk(keys.rsa, "a", "RS256")]
    started = time.monotonic()  # the first fetch begins after this, when the worker starts
    gateway = await plugway_gateway(auth_config(jwks_plugin(jwks_server.url, jwks_min_refresh="1s")))
    assert await status_of(gateway, sign(keys.rsa, "RS256", kid="a")) == 200
    assert jwks_server.fetches == 1

    async def flood() -> None:
        tokens = [sign(keys.rsa, "RS256", kid=secrets.token_hex(8)) for _ in range(50)]
        assert set(await asyncio.gather(*(status_of(gateway, token) for token in tokens))) == {401}

    # 50 unknown kids, and no more fetches than whole intervals since the first fetch began
    # (none on a quick machine, however busy the machine is).
    await flood()
    assert jwks_server.fetches - 1 <= intervals_since(started, 1.0)
    # Once the interval has passed, one unknown kid triggers one fetch (one request at a time,
    # each waiting for the fetch it began); a flood right after adds none within the interval.
    before, sent = jwks_server.fetches, []
    await eventually(lambda: _refetched(gateway, jwks_server, sign, keys, before, sent))
    assert jwks_server.fetches == before + 1
    await flood()
    assert jwks_server.fetches - (before + 1) <= intervals_since(sent[-1], 1.0)


async def _refetched(gateway, jwks_server, sign, keys, before: int, sent: list[float]) -> bool:
    sent.append(time.monotonic())
    assert await status_of(gateway, sign(keys.rsa, "RS256", kid=secrets.token_hex(8))) == 401
    return jwks_server.fetches > before


async def test_the_key_set_is_kept_for_its_max_age_and_then_refreshed(plugway_gateway, auth_config, jwks_server,
                                                                      keys, sign):
    jwks_server.keys = [keys.jwk(keys.rsa, "a", "RS256")]
    jwks_server.cache_control = "public, max-age=1"
    gateway = await plugway_gateway(auth_config(jwks_plugin(jwks_server.url, jwks_min_refresh="100ms")))
    token = sign(keys.rsa, "RS256", kid="a")
    await eventually(lambda: _fetches_reach(gateway, jwks_server, token, 2))
    first, second = jwks_server.fetched_at[:2]
    # The gateway keeps the set for max-age from the end of the fetch, which the server answered
    # before: however many requests came meanwhile, the next fetch comes a whole max-age later.
    assert second - first >= 1.0


async def _fetches_reach(gateway, jwks_server, token, count) -> bool:
    assert await status_of(gateway, token) == 200  # stale keys keep serving while one fetch replaces them
    return jwks_server.fetches >= count


async def test_an_identity_provider_down_at_start_gives_503_then_recovers(plugway_gateway, auth_config, jwks_server,
                                                                          keys, sign):
    jwks_server.keys = [keys.jwk(keys.rsa, "a", "RS256")]
    jwks_server.status = 500
    gateway = await plugway_gateway(auth_config(jwks_plugin(jwks_server.url, jwks_min_refresh="300ms")))
    token = sign(keys.rsa, "RS256", kid="a")
    async with gateway.client.get("/api/x", headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 503
        assert (await response.json())["error"]["code"] == "auth_unavailable"
        assert response.headers["Retry-After"] == "1"
    assert gateway.metric("plugway_auth_jwks_fetches_total", issuer="idp", result="http_error") >= 1
    jwks_server.status = 200
    await eventually(lambda: _is(gateway, token, 200))


async def test_the_last_good_keys_stay_while_the_identity_provider_fails(plugway_gateway, auth_config, jwks_server,
                                                                         keys, sign):
    jwks_server.keys = [keys.jwk(keys.rsa, "a", "RS256")]
    jwks_server.cache_control = "max-age=0"
    gateway = await plugway_gateway(auth_config(jwks_plugin(jwks_server.url, jwks_min_refresh="100ms")))
    token = sign(keys.rsa, "RS256", kid="a")
    assert await status_of(gateway, token) == 200
    jwks_server.status = 503
    await eventually(lambda: _failed_fetches(gateway, token))
    assert await status_of(gateway, token) == 200


async def _failed_fetches(gateway, token) -> bool:
    assert await status_of(gateway, token) == 200
    return gateway.metric("plugway_auth_jwks_fetches_total", issuer="idp", result="http_error") >= 2


@pytest.mark.parametrize("document, result", [
    ({"keys": [{"kty": "oct", "k": "c2VjcmV0"}] * 40}, "too_large"),
    ({"nokeys": []}, "invalid"),
])
async def test_oversized_or_invalid_documents_are_refused(plugway_gateway, auth_config, aiohttp_server, keys, sign,
                                                          document, result):
    from aiohttp import web

    async def handle(request):
        return web.json_response(document)

    app = web.Application()
    app.router.add_get("/jwks", handle)
    server = await aiohttp_server(app)
    gateway = await plugway_gateway(auth_config(jwks_plugin(str(server.make_url("/jwks")))))
    assert await status_of(gateway, sign(keys.rsa, "RS256", kid="a")) == 503
    assert gateway.metric("plugway_auth_jwks_fetches_total", issuer="idp", result=result) == 1


async def test_a_huge_jwks_response_is_cut_off(plugway_gateway, auth_config, aiohttp_server, keys, sign):
    from aiohttp import web

    async def handle(request):
        return web.Response(body=json.dumps({"keys": [], "padding": "x" * 400_000}), content_type="application/json")

    app = web.Application()
    app.router.add_get("/jwks", handle)
    server = await aiohttp_server(app)
    gateway = await plugway_gateway(auth_config(jwks_plugin(str(server.make_url("/jwks")))))
    assert await status_of(gateway, sign(keys.rsa, "RS256", kid="a")) == 503
    assert gateway.metric("plugway_auth_jwks_fetches_total", issuer="idp", result="too_large") == 1


async def test_unusable_keys_in_a_document_are_skipped(plugway_gateway, auth_config, jwks_server, keys, sign):
    private = keys.jwk(keys.rsa_other, "p", "RS256")
    private["d"] = "AQAB"
    jwks_server.keys = [{"kty": "oct", "k": "c2VjcmV0", "kid": "s"}, private, keys.jwk(keys.rsa, "enc", "RS256") | {
        "use": "enc"}, keys.jwk(keys.ec256, "mismatch", "ES384"), keys.jwk(keys.rsa, "a", "RS256")]
    gateway = await plugway_gateway(auth_config(jwks_plugin(jwks_server.url)))
    assert await status_of(gateway, sign(keys.rsa, "RS256", kid="a")) == 200
    assert await status_of(gateway, sign(keys.rsa, "RS256", kid="enc")) == 401
    assert await status_of(gateway, sign(keys.ec256, "ES256", kid="mismatch")) == 401
    assert await status_of(gateway, sign(keys.rsa_other, "RS256", kid="p")) == 401
    assert jwks_server.fetches == 1
