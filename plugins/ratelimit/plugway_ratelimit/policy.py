"""Rate-limit policy: which limits apply to a request, under which keys, and the headers to send.

Pure functions over settings and request facts; no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from gateway import Rate, setting
from gateway.store import Limit, LimitResult

Algorithm = Literal["token_bucket", "sliding_window"]
KEY_KINDS = ("consumer", "consumer_or_ip", "api_key", "ip", "route", "global")


def _check_key(raw: object) -> str:
    if isinstance(raw, str) and (raw in KEY_KINDS or raw.startswith("header:") and len(raw) > 7):
        return raw
    raise ValueError(f"{raw!r} must be one of {', '.join(KEY_KINDS)} or header:NAME")


@dataclass(frozen=True)
class LimitSettings:
    rate: Rate = setting(doc='How many requests per period, as "100/m".')
    name: str = setting("default", doc="Name in metrics and in the RateLimit-Policy header.")
    key: str = setting(
        "consumer_or_ip", parse=_check_key,
        doc="What is counted: consumer, consumer_or_ip, api_key, ip, route, global or header:NAME.",
    )
    burst: int = setting(0, doc="Token bucket capacity (0: the rate's count).")
    algorithm: Algorithm | None = setting(None, doc="token_bucket or sliding_window (default: the plugin's).")
    tiers: Mapping[str, Rate] = setting(
        factory=dict, doc='Rate by consumer role or plan, e.g. { anonymous = "20/m", premium = "10000/m" }.',
    )
    exempt: tuple[str, ...] = setting((), doc="Consumer roles this limit does not apply to.")
    shared_by_routes: bool = setting(False, doc="Count every route together instead of each route on its own.")


@dataclass(frozen=True)
class RateLimitSettings:
    limit: Rate | None = setting(
        None, doc='Shorthand for one limit keyed by consumer, else client IP: "100/m"; replaces "limits" when set.',
    )
    limits: tuple[LimitSettings, ...] = setting((), doc="Several limits; a request must pass all of them.")
    algorithm: Algorithm = setting("token_bucket", doc="Default algorithm: token_bucket or sliding_window.")
    headers: Literal["draft", "legacy", "both", "none"] = setting(
        "draft", doc="RateLimit-Policy/RateLimit (IETF draft), X-RateLimit-* (legacy), both or none.",
    )
    on_store_error: Literal["fail_open", "fail_closed", "local"] = setting(
        "fail_open", doc="When the store fails: allow and count, refuse with 503, or use the host-local store.",
    )
    api_key_header: str = setting("X-API-Key", doc='Header read by key = "api_key".')

    def validate(self):
        if self.limit is None and not self.limits:
            yield "", 'needs "limit" or "limits"'
        names = [limit.name for limit in self.effective_limits]
        if len(names) != len(set(names)):
            yield "limits", "limit names must be unique"

    @property
    def effective_limits(self) -> tuple[LimitSettings, ...]:
        if self.limit is not None:
            return (LimitSettings(rate=self.limit),)
        return self.limits


@dataclass(frozen=True)
class Caller:
    """The facts about a request that limits key on."""

    route: str
    consumer_id: str | None
    roles: tuple[str, ...]
    client_ip: str
    api_key: str | None
    header: Mapping[str, str]


def applicable_limits(settings: RateLimitSettings, caller: Caller) -> list[tuple[LimitSettings, Limit]]:
    """The store limits for this request, each with the settings it came from."""
    out = []
    for spec in settings.effective_limits:
        if spec.exempt and set(spec.exempt) & set(caller.roles):
            continue
        rate = _rate_for(spec, caller)
        scope = "*" if spec.shared_by_routes else caller.route
        key = "rl:{%s:%s:%s}" % (scope, spec.name, _key_value(spec.key, caller))
        algorithm = spec.algorithm or settings.algorithm
        out.append((spec, Limit(key, algorithm, rate.count, rate.period, spec.burst)))
    return out


def _rate_for(spec: LimitSettings, caller: Caller) -> Rate:
    if not spec.tiers:
        return spec.rate
    if caller.consumer_id is None:
        return spec.tiers.get("anonymous", spec.rate)
    for role in caller.roles:
        if role in spec.tiers:
            return spec.tiers[role]
    return spec.tiers.get("default", spec.rate)


def _key_value(kind: str, caller: Caller) -> str:
    if kind == "consumer":
        value = caller.consumer_id or "anonymous"
    elif kind == "consumer_or_ip":
        value = f"c:{caller.consumer_id}" if caller.consumer_id else f"ip:{caller.client_ip}"
    elif kind == "api_key":
        value = caller.api_key or "none"
    elif kind == "ip":
        value = caller.client_ip
    elif kind in ("route", "global"):
        value = "*"
    else:
        value = caller.header.get(kind[7:].lower()) or "-"
    if len(value) > 64 or not value.isprintable() or "{" in value or "}" in value:
        value = "h:" + hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return value


def hash_api_key(key: str | None) -> str | None:
    """Limits key on a hash of the API key: the key itself never reaches the store."""
    return None if key is None else hashlib.sha256(key.encode()).hexdigest()[:32]


def rate_headers(style: str, specs: Sequence[LimitSettings], results: Sequence[LimitResult]) -> list[tuple[str, str]]:
    """RateLimit-Policy/RateLimit (draft-ietf-httpapi-ratelimit-headers) and/or X-RateLimit-*."""
    if style == "none" or not results:
        return []
    headers = []
    if style in ("draft", "both"):
        policies = ", ".join(f'"{s.name}";q={r.limit};w={_seconds(s.rate.period)}' for s, r in zip(specs, results))
        states = ", ".join(f'"{s.name}";r={r.remaining};t={_seconds(r.reset)}' for s, r in zip(specs, results))
        headers += [("RateLimit-Policy", policies), ("RateLimit", states)]
    if style in ("legacy", "both"):
        tightest = min(results, key=lambda result: (result.remaining, -result.reset))
        headers += [
            ("X-RateLimit-Limit", str(tightest.limit)),
            ("X-RateLimit-Remaining", str(tightest.remaining)),
            ("X-RateLimit-Reset", str(_seconds(tightest.reset))),
        ]
    return headers


def retry_after(results: Iterable[LimitResult]) -> int:
    return max(1, max(_seconds(result.retry_after) for result in results if not result.allowed))


def _seconds(value: float) -> int:
    return max(0, int(-(-value // 1)))
