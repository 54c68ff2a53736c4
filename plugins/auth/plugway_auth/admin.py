"""The plugin's admin API endpoint: ``POST /auth/revocations``.

    {"jti": "...", "expires_at": 1767225600}     revoke one token (expires_at: its exp, optional)
    {"consumer": "alice", "before": 1767225600}  revoke every token of alice issued before then
                                                 (before: optional, default now)

Revocations go to the shared store, so any worker (and any host sharing a Redis store) may
answer the call and all of them reject the token within a second. A token revocation is
kept until ``expires_at`` plus ``leeway`` (the token is accepted until then), rounded up to
a second. Without ``expires_at`` (the call names a jti, not the token, so its exp is
unknown) it is kept for ``max_lifetime`` plus ``leeway``: long enough for any token that is
valid now and has an ``iat`` in the past. Consumer revocations are kept that long after
``before`` (or now). The core requires the admin token here whenever ``admin.token_env``
is set.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from aiohttp import web

from gateway.store import Store, StoreUnavailable

from .revocation import MAX_TTL, revoke_consumer, revoke_token


def revocation_handler(store: Callable[[], Store], longest_life: float, leeway: float):
    async def revoke(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body must be a JSON object")
        if not isinstance(body, dict) or ("jti" in body) == ("consumer" in body):
            return _error(400, 'give either "jti" or "consumer"')
        now = time.time()
        try:
            if "jti" in body:
                jti, expires_at = body["jti"], body.get("expires_at")
                if not _name(jti) or expires_at is not None and not _number(expires_at):
                    return _error(400, '"jti" must be a non-empty string, "expires_at" a number')
                ttl = longest_life if expires_at is None else _until(expires_at + leeway, now)
                await revoke_token(store(), jti, ttl)
                return web.json_response({"revoked": {"jti": jti}, "ttl": round(max(ttl, 1.0), 3)})
            consumer, before = body["consumer"], body.get("before", now)
            if not _name(consumer) or not _number(before):
                return _error(400, '"consumer" must be a non-empty string, "before" a number')
            before, ttl = await revoke_consumer(store(), consumer, float(before), longest_life, now)
            return web.json_response({"revoked": {"consumer": consumer, "before": before}, "ttl": round(ttl, 3)})
        except StoreUnavailable:
            return _error(503, "the store is unavailable; retry the revocation", code="store_unavailable")

    return revoke


def _until(last_accepted: float, now: float) -> float:
    """The TTL of a revocation that must last until ``last_accepted`` (a token's exp plus leeway),
    rounded up to a whole second and bounded by MAX_TTL (an expires_at far out is no reason to
    fail the call)."""
    return min(math.ceil(last_accepted - now), MAX_TTL)


def _name(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 256


def _number(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _error(status: int, message: str, code: str = "bad_request") -> web.Response:
    return web.json_response({"error": {"status": status, "code": code, "message": message}}, status=status)
