"""Authorization: roles with inheritance, ``resource:action`` permissions, rules per path and method
(see README.md for the settings and the semantics).

The plugin decides in ``on_request`` from ``ctx.consumer``, which an authentication plugin of
higher priority (auth, 1000) set, and ``ctx.path``, the canonical path routing used. Its
settings are compiled once per configuration and route (``RbacSettings.policy``); a request
costs a few regular-expression matches and set lookups.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

from gateway import GatewayError, PluginDeclaration, hookimpl, setting

from .patterns import PathPattern
from .policy import (
    ALLOWED, OWNER_VALUE, UNAUTHENTICATED, NO_MATCHING_RULE, Policy, PolicyErrors, Verdict, compile_policy,
    permission_problem,
)

NAME = "rbac"


@dataclass(frozen=True)
class RoleSettings:
    permissions: tuple[str, ...] = setting(
        (), doc='Permissions the role grants: "tasks:read", or with wildcards "tasks:*", "*:read", "*:*".',
    )
    inherits: tuple[str, ...] = setting((), doc="Roles whose permissions this role has too (transitively).")

    def validate(self):
        for position, permission in enumerate(self.permissions):
            problem = permission_problem(permission, wildcards=True)
            if problem:
                yield f"permissions[{position}]", problem


@dataclass(frozen=True)
class OwnerSettings:
    param: str = setting(doc="The placeholder of the rule's path that names the owner: id for /users/{id}.")
    equals: str = setting("consumer.id", doc='What it must equal: "consumer.id" or "claims.NAME" (a claim).')
    unless: str | None = setting(None, doc="A permission that lifts the condition, as users:admin.")

    def validate(self):
        if not OWNER_VALUE.fullmatch(self.equals):
            yield "equals", f'must be "consumer.id" or "claims.NAME", not {self.equals!r}'
        if self.unless is not None:
            problem = permission_problem(self.unless, wildcards=False)
            if problem:
                yield "unless", problem


@dataclass(frozen=True)
class RuleSettings:
    path: PathPattern = setting(
        parse=PathPattern.parse, render=str,
        doc='Pattern of the canonical path: "/api/tasks/**"; * is one segment, ** any, {name} one (captured).',
    )
    methods: tuple[str, ...] = setting((), doc="Methods the rule applies to (GET includes HEAD); empty: all.")
    require: tuple[str, ...] = setting((), doc="Permissions the consumer must all hold; empty: any consumer.")
    roles: tuple[str, ...] = setting((), doc="Roles of which the consumer must hold one, directly or by inheritance.")
    public: bool = setting(False, doc="Let every request through, with or without a consumer.")
    owner: OwnerSettings | None = setting(
        None, doc='Ownership condition: { param = "id", equals = "consumer.id", unless = "users:admin" }.',
    )

    def validate(self):
        for position, method in enumerate(self.methods):
            if not method.isalpha() or not method.isupper():
                yield f"methods[{position}]", f"{method!r} is not an upper-case HTTP method"
        for position, permission in enumerate(self.require):
            problem = permission_problem(permission, wildcards=False)
            if problem:
                yield f"require[{position}]", problem
        if self.public and (self.require or self.roles or self.owner):
            yield "public", "a public rule cannot also require permissions, roles or ownership"
        if self.owner is not None and self.owner.param not in self.path.names:
            known = ", ".join(f"{{{name}}}" for name in self.path.names) or "none"
            yield "owner.param", (f"{self.owner.param!r} is not a placeholder of {self.path.text!r} "
                                  f"(placeholders: {known})")


@dataclass(frozen=True)
class RbacSettings:
    roles: Mapping[str, RoleSettings] = setting(
        factory=dict, doc="Roles by name: { permissions = [...], inherits = [...] }.",
    )
    rules: tuple[RuleSettings, ...] = setting(
        (), doc="Rules in order; the first whose path and method match decides. A route's list replaces this one.",
    )
    default: Literal["deny", "allow"] = setting(
        "deny", doc="When no rule matches: deny (403 no_matching_rule) or allow.",
    )
    scopes_as_permissions: bool = setting(
        False, doc="Count the consumer's OAuth scopes as permissions it holds (compared exactly).",
    )

    def validate(self):
        try:
            self.policy
        except PolicyErrors as errors:
            yield from errors.problems

    @cached_property
    def policy(self) -> Policy:
        return compile_policy(self.roles, self.rules, scopes_as_permissions=self.scopes_as_permissions,
                              default_allow=self.default == "allow")


class Unauthenticated(GatewayError):
    """The same code as the auth plugin's answer to a request without credentials."""

    status, code, message = 401, "missing_credentials", "credentials are required"


class Forbidden(GatewayError):
    status, code, message = 403, "forbidden", "this request is not allowed"


class NoMatchingRule(GatewayError):
    status, code, message = 403, "no_matching_rule", "no authorization rule matches this request"


@hookimpl
def declare_plugin():
    return PluginDeclaration(settings=RbacSettings, priority=950)


@hookimpl
def worker_started(gateway):
    gateway.state[NAME] = gateway.metrics.counter(
        "plugway_rbac_decisions_total", "Authorization decisions, by route and result.", ("route", "result"),
        per_request=True,
    )


@hookimpl
def on_request(ctx, settings):
    verdict = settings.policy.decide(ctx.method, ctx.path, ctx.consumer)
    ctx.gateway.state[NAME].labels(ctx.route.name, verdict.result).inc()
    if verdict.rule is not None:
        ctx.log["rbac_rule"] = verdict.rule
    if verdict.result != ALLOWED:
        raise refusal(verdict, settings.scopes_as_permissions)


def refusal(verdict: Verdict, scopes_as_permissions: bool) -> GatewayError:
    """The error a refused request gets. The message names what is missing, never the consumer's roles."""
    if verdict.result == UNAUTHENTICATED:
        # RFC 6750 section 3.1: no error attribute when the request carried no credentials;
        # an auth plugin that saw invalid ones has already answered.
        return Unauthenticated(headers=[("WWW-Authenticate", "Bearer")])
    if verdict.result == NO_MATCHING_RULE:
        return NoMatchingRule(verdict.message)
    headers = []
    if scopes_as_permissions and verdict.missing:
        scope = " ".join(verdict.missing)
        headers.append(("WWW-Authenticate", f'Bearer error="insufficient_scope", scope="{scope}"'))
    return Forbidden(verdict.message, headers=headers)
