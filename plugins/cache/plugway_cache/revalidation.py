"""A request of the cache's own to the upstream, for stale-while-revalidate: the client already
has the stale answer, and the entry is refreshed in the background.

The gateway has no public API for a plugin to send a request upstream, so this goes
through the core's own functions (``gateway.pipeline.outgoing_request``, ``gateway.proxy``):
the request is the client's, as a GET, with the entry's validators, through the route's
``before_upstream`` hooks (so that header rules, identities and upstream choices of other
plugins apply as they do to a miss), to the route's upstream.
"""

from __future__ import annotations

import inspect
import time
from typing import TYPE_CHECKING

from multidict import CIMultiDict

from gateway import pipeline, proxy
from gateway.context import RequestContext
from gateway.errors import GatewayError

from .validators import CONDITIONAL_FIELDS

if TYPE_CHECKING:
    from .entries import Entry

_COPIED = ("host", "path", "query", "path_params", "route", "client_ip", "peer_ip", "peer_trusted", "scheme",
           "listener_scheme", "request_id", "consumer", "version")


class Fetched:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: CIMultiDict[str], body: bytes | None) -> None:
        self.status = status
        self.headers = headers
        self.body = body  # None when it was larger than the limit (or the response is a 304)


async def fetch(ctx: RequestContext, entry: Entry, limit: int, own_state_key: str) -> Fetched | None:
    """The upstream's answer to a conditional GET for ``ctx``'s target; None if a plugin answered
    instead. Raises ``GatewayError`` when the upstream fails."""
    sub = RequestContext(ctx.request, ctx.gateway, time.monotonic())
    for name in _COPIED:
        setattr(sub, name, getattr(ctx, name))
    sub.method = "GET"
    sub.state = {key: value for key, value in ctx.state.items() if key != own_state_key}
    outgoing = pipeline.outgoing_request(sub)
    outgoing.method = "GET"
    headers = outgoing.headers
    for name in CONDITIONAL_FIELDS:
        headers.popall(name, None)
    if entry.etag is not None:
        headers["If-None-Match"] = entry.etag
    if entry.last_modified is not None:
        headers["If-Modified-Since"] = entry.last_modified
    for step in sub.route.chain.before_upstream:
        result = step(sub, outgoing)
        if inspect.isawaitable(result):
            result = await result
        if result is not None:
            return None
    upstream = sub.gateway.upstream(outgoing.upstream_name) if outgoing.upstream_name else sub.route.upstream
    sub.upstream = upstream
    response = await proxy.send(sub, outgoing, upstream)
    try:
        body = None
        length = response.content_length
        if response.status != 304 and (length is None or length <= limit):
            try:
                body = await response.read(limit)
            except GatewayError:
                body = None
        return Fetched(response.status, CIMultiDict(response.headers), body)
    finally:
        proxy.finish(sub, response)
