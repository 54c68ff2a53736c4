"""IP restriction: allow and deny lists of addresses and CIDR ranges, per route or global.

The decision is made on ``ctx.client_ip``, the address the core derived
through ``server.trusted_proxies``: an ``X-Forwarded-For`` from anyone else
never reaches it. Refusals are 403 ``ip_forbidden`` in the core's JSON shape,
counted in ``plugway_iprestrict_denied_total{route}``.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway import GatewayError, PluginDeclaration, hookimpl, setting

from .addresses import AddressSet, permitted

NAME = "iprestrict"


@dataclass(frozen=True)
class IpRestrictSettings:
    allow: AddressSet = setting(
        factory=AddressSet, parse=AddressSet.parse, render=AddressSet.render,
        doc="Addresses and CIDR ranges (IPv4, IPv6) that may call; when set, every other address gets 403.",
    )
    deny: AddressSet = setting(
        factory=AddressSet, parse=AddressSet.parse, render=AddressSet.render,
        doc="Addresses and CIDR ranges that get 403; deny wins over allow.",
    )

    def validate(self):
        if not self.allow and not self.deny:
            yield "", "set allow, deny or both: an empty rule would let every address through"


class AddressForbidden(GatewayError):
    status, code, message = 403, "ip_forbidden", "requests from this address are not allowed"


@hookimpl
def declare_plugin():
    return PluginDeclaration(settings=IpRestrictSettings, priority=2100)


@hookimpl
def worker_started(gateway):
    gateway.state[NAME] = gateway.metrics.counter(
        "plugway_iprestrict_denied_total", "Requests refused by the iprestrict plugin, by route.", ("route",),
    )


@hookimpl
def on_request(ctx, settings):
    if not permitted(ctx.client_ip, settings.allow, settings.deny):
        ctx.gateway.state[NAME].labels(ctx.route.name).inc()
        raise AddressForbidden()
