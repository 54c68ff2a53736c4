"""The iprestrict plugin against the real gateway, and its address sets against ipaddress."""

from __future__ import annotations

import ipaddress
import json
import random

import pytest
from aiohttp import web

from gateway.config.schema import ConfigErrors
from gateway.testing import proxy_config, route_table
from plugway_iprestrict.addresses import AddressSet, permitted


async def start(plugway_gateway, aiohttp_raw_server, plugins: str, server: str = "", route: str = ""):
    """A gateway with routes /api (iprestrict as configured) and /open (iprestrict off) to an upstream
    that answers "ok"; returns it and the paths served."""
    served = []

    async def handler(request):
        served.append(request.path)
        return web.Response(text="ok")

    upstream = await aiohttp_raw_server(handler)
    gateway = await plugway_gateway(proxy_config(upstream.make_url(""), server=server, route=route, plugins=plugins,
                                                 routes=route_table("open", iprestrict="enabled = false")))
    return gateway, served


async def status_of(gateway, path: str = "/api/x", forwarded_for: str | None = None) -> int:
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    async with gateway.client.get(path, headers=headers) as response:
        await response.read()
        return response.status


async def test_an_address_outside_the_allow_list_gets_the_core_json_403(plugway_gateway, aiohttp_raw_server):
    gateway, served = await start(plugway_gateway, aiohttp_raw_server, """
        [plugins.iprestrict]
        allow = ["10.0.0.0/8", "2001:db8::/32"]
    """)
    async with gateway.client.get("/api/x") as response:
        body = json.loads(await response.read())
        assert response.status == 403
        assert response.headers["Content-Type"] == "application/json"
    assert body["error"]["code"] == "ip_forbidden"
    assert body["error"]["request_id"] == response.headers["X-Request-ID"]
    assert served == []
    metrics = gateway.gateway.metrics.exposition().decode()
    assert 'plugway_iprestrict_denied_total{route="api"} 1.0' in metrics


async def test_an_allowed_address_reaches_the_upstream(plugway_gateway, aiohttp_raw_server):
    gateway, served = await start(plugway_gateway, aiohttp_raw_server, """
        [plugins.iprestrict]
        allow = ["192.0.2.1", "127.0.0.0/8"]
    """)
    assert await status_of(gateway) == 200
    assert served == ["/api/x"]


async def test_deny_wins_over_allow(plugway_gateway, aiohttp_raw_server):
    gateway, served = await start(plugway_gateway, aiohttp_raw_server, """
        [plugins.iprestrict]
        allow = ["127.0.0.0/8"]
        deny = ["127.0.0.1"]
    """)
    assert await status_of(gateway) == 403
    assert served == []


async def test_a_spoofed_forwarded_for_from_an_untrusted_peer_changes_nothing(plugway_gateway, aiohttp_raw_server):
    gateway, served = await start(plugway_gateway, aiohttp_raw_server, """
        [plugins.iprestrict]
        allow = ["10.0.0.0/8"]
        deny = ["127.0.0.1"]
    """)
    assert await status_of(gateway, forwarded_for="10.1.2.3") == 403
    assert await status_of(gateway, forwarded_for="127.0.0.2, 10.1.2.3") == 403
    assert served == []


async def test_behind_trusted_proxies_the_derived_client_address_decides(plugway_gateway, aiohttp_raw_server):
    gateway, served = await start(plugway_gateway, aiohttp_raw_server, server='trusted_proxies = ["127.0.0.1/32"]',
                                  plugins="""
        [plugins.iprestrict]
        allow = ["203.0.113.0/24", "2001:db8::/32"]
        deny = ["203.0.113.66", "2001:db8:bad::/48"]
    """)
    assert await status_of(gateway, forwarded_for="203.0.113.9") == 200
    assert await status_of(gateway, forwarded_for="2001:db8::5") == 200
    assert await status_of(gateway, forwarded_for="203.0.113.66") == 403
    assert await status_of(gateway, forwarded_for="2001:db8:bad::1") == 403
    # The client wrote the left part; the trusted proxy appended the address it saw.
    assert await status_of(gateway, forwarded_for="203.0.113.9, 198.51.100.7") == 403
    assert await status_of(gateway, forwarded_for="198.51.100.7, 203.0.113.9") == 200
    assert len(served) == 3


async def test_rules_are_per_route(plugway_gateway, aiohttp_raw_server):
    gateway, served = await start(plugway_gateway, aiohttp_raw_server, route="""
        [routes.plugins.iprestrict]
        allow = ["127.0.0.0/8"]
    """, plugins="""
        [plugins.iprestrict]
        allow = ["10.0.0.0/8"]
    """)
    assert await status_of(gateway, "/api/x") == 200  # the route's allow replaces the global one
    assert await status_of(gateway, "/open/x") == 200  # enabled = false on this route
    assert served == ["/api/x", "/open/x"]


async def test_bad_entries_and_empty_rules_are_configuration_errors(plugway_gateway, aiohttp_raw_server):
    with pytest.raises(ConfigErrors) as caught:
        await start(plugway_gateway, aiohttp_raw_server, route="""
            [routes.plugins.iprestrict]
            deny = ["10.0.0.0/8", "10.0.0.300"]
        """, plugins="""
            [plugins.iprestrict]
        """)
    messages = [str(error) for error in caught.value.errors]
    assert "routes[0].plugins.iprestrict.deny: entry 1 ('10.0.0.300') is not an IPv4/IPv6 address or CIDR range" \
        in messages
    assert any(m.startswith("plugins.iprestrict: set allow, deny or both") for m in messages)


def test_range_boundaries_are_exact():
    addresses = AddressSet(["192.0.2.0/24", "2001:db8::/126"])
    assert "192.0.2.0" in addresses and "192.0.2.255" in addresses
    assert "192.0.1.255" not in addresses and "192.0.3.0" not in addresses
    assert "2001:db8::3" in addresses and "2001:db8::4" not in addresses
    assert "unix" not in addresses and "" not in addresses and "192.0.2.1.5" not in addresses


def test_ipv4_mapped_spellings_count_as_their_ipv4_address():
    addresses = AddressSet(["10.0.0.0/8", "::ffff:192.0.2.0/120"])
    assert "::ffff:10.1.2.3" in addresses
    assert "192.0.2.7" in addresses
    assert "::ffff:192.0.2.7" in addresses
    assert "::10.1.2.3" not in addresses  # IPv4-compatible, not mapped: a different address


def test_overlapping_and_adjacent_ranges_merge_without_losing_addresses():
    addresses = AddressSet(["10.0.0.0/25", "10.0.0.128/25", "10.0.0.64/26", "10.0.2.0/24", "10.0.1.5", "10.0.3.1"])
    inside = ["10.0.0.0", "10.0.0.127", "10.0.0.128", "10.0.0.255", "10.0.1.5", "10.0.2.255", "10.0.3.1"]
    outside = ["10.0.1.4", "10.0.1.6", "10.0.3.0", "10.0.3.2", "9.255.255.255"]
    assert all(address in addresses for address in inside)
    assert not any(address in addresses for address in outside)


def test_lookups_agree_with_ipaddress_over_thousands_of_random_ranges():
    rng = random.Random(7)
    networks = [ipaddress.IPv4Network((rng.getrandbits(32), rng.randint(8, 32)), strict=False) for _ in range(3000)]
    networks += [ipaddress.IPv6Network((rng.getrandbits(128), rng.randint(16, 128)), strict=False) for _ in range(1000)]
    addresses = AddressSet([str(network) for network in networks])
    probes = [str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(2000)]
    probes += [str(network.broadcast_address) for network in networks[::7]]
    probes += [str(ipaddress.IPv6Address(rng.getrandbits(128))) for _ in range(500)]
    for probe in probes:
        ip = ipaddress.ip_address(probe)
        assert (probe in addresses) == any(ip in network for network in networks), probe


def test_without_an_allow_list_everything_not_denied_passes():
    assert permitted("192.0.2.1", AddressSet(), AddressSet(["10.0.0.0/8"]))
    assert not permitted("10.9.9.9", AddressSet(), AddressSet(["10.0.0.0/8"]))
    assert not permitted("unix", AddressSet(["10.0.0.0/8"]), AddressSet())
