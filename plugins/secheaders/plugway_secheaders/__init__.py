"""Security response headers, per route or global, on every response (errors included).

Each header has its own setting with a default suited to an API; an empty
string turns it off. ``Strict-Transport-Security`` is sent only on responses
to requests that came over TLS (``ctx.scheme == "https"``): browsers ignore it
over plain HTTP, and sending it there would only mislead. Headers that leak
what runs behind the gateway (``Server``, ``X-Powered-By``) are removed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType

from gateway import PluginDeclaration, hookimpl, setting

from .headers import HeaderPolicy, problems

# Setting name -> header, in the order the headers are added.
HEADERS = {
    "strict_transport_security": "Strict-Transport-Security",
    "x_content_type_options": "X-Content-Type-Options",
    "x_frame_options": "X-Frame-Options",
    "referrer_policy": "Referrer-Policy",
    "content_security_policy": "Content-Security-Policy",
    "permissions_policy": "Permissions-Policy",
}


@dataclass(frozen=True)
class SecHeadersSettings:
    strict_transport_security: str = setting(
        "max-age=31536000", doc='HSTS, sent only over TLS; e.g. "max-age=63072000; includeSubDomains; preload".',
    )
    x_content_type_options: str = setting("nosniff", doc="Stops browsers guessing a content type.")
    x_frame_options: str = setting("DENY", doc='"DENY" or "SAMEORIGIN": who may frame the response.')
    referrer_policy: str = setting("strict-origin-when-cross-origin", doc="How much of the URL a Referer carries.")
    content_security_policy: str = setting(
        "frame-ancestors 'none'", doc="Content-Security-Policy; the default only forbids framing (fits an API).",
    )
    permissions_policy: str = setting("", doc='Permissions-Policy, e.g. "camera=(), geolocation=()".')
    headers: Mapping[str, str] = setting(factory=lambda: MappingProxyType({}), doc="Other headers to add, by name.")
    remove: tuple[str, ...] = setting(
        ("Server", "X-Powered-By"), doc="Upstream response headers to remove (they tell what runs behind).",
    )
    override: bool = setting(False, doc="Replace values the upstream set; by default the upstream's value wins.")

    def validate(self):
        values = {key: getattr(self, key) for key in HEADERS}
        yield from problems(values, HEADERS.values(), self.headers, self.remove)

    @cached_property
    def policy(self) -> HeaderPolicy:
        added = [(header, getattr(self, key)) for key, header in HEADERS.items()]
        return HeaderPolicy([*added, *self.headers.items()], self.remove, self.override)


@hookimpl
def declare_plugin():
    return PluginDeclaration(settings=SecHeadersSettings, priority=1900)


@hookimpl
def on_response(ctx, settings, response):
    settings.policy.apply(response.headers, ctx.scheme == "https")
