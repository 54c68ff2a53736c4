"""CORS: preflights answered by the gateway, CORS headers on actual responses, per route or global.

A preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``)
is answered here with 204 and never reaches the upstream or the plugins
after this one (auth among them: a preflight carries no credentials); one
the policy does not allow gets 403 ``cors_preflight_refused`` without any
CORS header. On a route where this plugin runs it owns the CORS headers:
the upstream's own ``Access-Control-*`` response headers are replaced.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from gateway import Duration, GatewayError, PluginDeclaration, Response, hookimpl, setting
from gateway.headers import add_vary

from .policy import CORS_RESPONSE_HEADERS, Origins, Policy, Refused, list_problem

NAME = "cors"


@dataclass(frozen=True)
class CorsSettings:
    allow_origins: Origins = setting(
        parse=Origins.parse, render=Origins.render,
        doc='Origins allowed: "https://app.example.com", "https://*.example.com" (one label), "null", or "*".',
    )
    allow_methods: tuple[str, ...] = setting(
        ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"),
        doc='Methods allowed (case-sensitive, as browsers send them); "*" reflects the requested one.',
    )
    allow_headers: tuple[str, ...] = setting(
        ("*",), doc='Request headers allowed; "*" (the default) reflects the ones the preflight asks for.',
    )
    expose_headers: tuple[str, ...] = setting((), doc="Response headers scripts may read besides the safelisted.")
    allow_credentials: bool = setting(False, doc="Allow cookies and Authorization (never with any origin).")
    max_age: Duration = setting(Duration("10m"), doc="How long browsers may cache a preflight answer; 0s: no header.")

    def validate(self):
        for key, values, what in (("allow_methods", self.allow_methods, "method"),
                                  ("allow_headers", self.allow_headers, "header name"),
                                  ("expose_headers", self.expose_headers, "header name")):
            problem = list_problem(values, what)
            if problem:
                yield key, problem
        if not self.allow_methods:
            yield "allow_methods", "must list at least one method"
        if self.allow_credentials and self.allow_origins.any:
            yield "allow_credentials", 'cannot be true with allow_origins = ["*"]: list the origins instead'
        if self.allow_credentials and "*" in self.expose_headers:
            yield "expose_headers", '"*" exposes no header at all when allow_credentials is true: list them'

    @cached_property
    def policy(self) -> Policy:
        return Policy(self.allow_origins, self.allow_methods, self.allow_headers, self.expose_headers,
                      self.allow_credentials, int(self.max_age))


class PreflightRefused(GatewayError):
    status, code, message = 403, "cors_preflight_refused", "this cross-origin request is not allowed"


@hookimpl
def declare_plugin():
    return PluginDeclaration(settings=CorsSettings, priority=2000)


@hookimpl
def worker_started(gateway):
    gateway.state[NAME] = gateway.metrics.counter(
        "plugway_cors_preflights_total", "CORS preflights answered by the gateway, by result.", ("result",),
    )


@hookimpl
def on_request(ctx, settings):
    if ctx.method != "OPTIONS":
        return None
    headers = ctx.request.headers
    origin = headers.get("Origin")
    method = headers.get("Access-Control-Request-Method")
    if origin is None or method is None:
        return None  # an ordinary OPTIONS request: the upstream answers it
    counter = ctx.gateway.state[NAME]
    try:
        answer = settings.policy.preflight(origin, method, headers.get("Access-Control-Request-Headers"))
    except Refused as refusal:
        counter.labels("refused").inc()
        raise PreflightRefused(f"CORS preflight refused: {refusal}") from None
    counter.labels("allowed").inc()
    return Response(204, headers=answer)


@hookimpl
def on_response(ctx, settings, response):
    policy = settings.policy
    origin = ctx.request.headers.get("Origin")
    if origin is None and not policy.varies:
        return
    headers = response.headers
    if origin is not None:
        for name in CORS_RESPONSE_HEADERS:
            headers.popall(name, None)
        headers.extend(policy.actual(origin, ctx.method))
    if policy.varies:
        add_vary(headers, "Origin")
