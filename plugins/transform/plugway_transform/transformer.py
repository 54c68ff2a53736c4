"""Applying the compiled rules to one request (before it goes upstream) and one response.

Request bodies are read only when a body rule applies, the client sent a JSON
body with a Content-Length of at most ``max_body`` (and within the core's
``client_max_body``): a body without a length (chunked) or a larger one is
never touched, so it still streams. Response bodies are read only when they
are JSON and their size is known and at most ``max_body``. Every body passed
on untouched is counted by reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import bodies
from .querystring import QueryString
from .rules import Rule, header_value
from .templates import RequestValues

_NO_BODY_STATUSES = frozenset((204, 304))
# Request headers a client may not supply: templates never read them from the client.
FORWARDING_HEADERS = ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded", "x-real-ip")


@dataclass(frozen=True)
class TransformState:
    """Per worker: the headers templates may not read from clients, and the metrics."""

    protected: frozenset[str]
    skipped: Any  # Counter {direction, reason}
    transformed: Any  # Counter {direction}

    def skip(self, direction: str, reason: str) -> None:
        self.skipped.labels(direction, reason).inc()


async def transform_request(
    ctx: Any, outgoing: Any, rules: Sequence[Rule], settings: Any, state: TransformState,
) -> None:
    values = RequestValues(ctx, state.protected)
    headers = outgoing.headers
    for rule in rules:
        rule.headers.apply(headers, lambda template: header_value(template, values))
        if rule.query:
            query = QueryString(outgoing.query)
            rule.query.apply(query, lambda template: template.render(values))
            outgoing.query = str(query)
        if rule.path is not None:
            outgoing.path = rule.path.apply(outgoing.path, values)
    body_rules = [rule for rule in rules if rule.body]
    if body_rules and ctx.request.body_exists:
        await _transform_request_body(ctx, outgoing, body_rules, values, settings, state)


async def _transform_request_body(
    ctx: Any, outgoing: Any, rules: list[Rule], values: RequestValues, settings: Any, state: TransformState,
) -> None:
    request = ctx.request
    limit = min(settings.max_body, ctx.gateway.settings.server.client_max_body)
    try:
        if not bodies.is_json(request.headers.get("Content-Type")):
            raise bodies.Skip("not_json")
        coding = bodies.coding_of(request.headers.get("Content-Encoding"), settings.compressed)
        raw = outgoing.body
        if raw is None:
            bodies.check_size(request.content_length, limit)
            raw = await ctx.read_body(limit)
            outgoing.set_body(raw)  # read now: from here on it is sent from memory, changed or not
        changed = bodies.transform_json(raw, coding, limit, lambda document: _edit(document, rules, values))
    except bodies.Skip as skip:
        state.skip("request", skip.reason)
        return
    except bodies.NotJson:
        if settings.on_invalid == "reject":
            raise bodies.InvalidJsonBody() from None
        state.skip("request", "invalid_json")
        return
    if changed is not None:
        outgoing.set_body(changed)
        state.transformed.labels("request").inc()


async def transform_response(
    ctx: Any, response: Any, rules: Sequence[Rule], settings: Any, state: TransformState,
) -> None:
    values = RequestValues(ctx, state.protected)
    headers = response.headers
    for rule in rules:
        rule.headers.apply(headers, lambda template: header_value(template, values))
        if rule.status is not None and rule.status != response.status:
            response.status = rule.status
    body_rules = [rule for rule in rules if rule.body]
    if body_rules and ctx.method != "HEAD" and response.status >= 200 and response.status not in _NO_BODY_STATUSES:
        await _transform_response_body(response, headers, body_rules, values, settings, state)


async def _transform_response_body(
    response: Any, headers: Any, rules: list[Rule], values: RequestValues, settings: Any, state: TransformState,
) -> None:
    limit = settings.max_body
    try:
        if not bodies.is_json(headers.get("Content-Type")):
            raise bodies.Skip("not_json")
        bodies.check_size(_known_size(response, headers), limit)
        coding = bodies.coding_of(headers.get("Content-Encoding"), settings.compressed)
        raw = await response.read(limit)
        changed = bodies.transform_json(raw, coding, limit, lambda document: _edit(document, rules, values))
    except bodies.Skip as skip:
        state.skip("response", skip.reason)
        return
    except bodies.NotJson:
        state.skip("response", "invalid_json")  # the upstream's answer: passed on as it came
        return
    if changed is not None:
        response.set_body(changed)
        state.transformed.labels("response").inc()


def _known_size(response: Any, headers: Any) -> int | None:
    """The body's size when it is known for certain: the body a plugin (or the gateway) put in
    memory, or the upstream's Content-Length. An upstream body without one is never measured by
    waiting for it, so whether it is transformed cannot depend on how fast it arrived."""
    if response.length_changed:
        body = response.body_in_memory()
        return len(body) if body is not None else None
    length = headers.get("Content-Length")
    return int(length) if length is not None and length.strip().isdigit() else None


def _edit(document: Any, rules: list[Rule], values: RequestValues) -> bool:
    changed = False
    for rule in rules:
        changed |= rule.body.apply(document, values)
    return changed
