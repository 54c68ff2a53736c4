"""A request of the cache's own to the upstream, for stale-while-revalidate: the client already
has the stale answer, and the entry is refreshed in the background.

The request is the client's, as a conditional GET with the entry's validators, sent with the
core's ``ctx.upstream_request``: through the route's ``before_upstream`` hooks (so that header
rules, identities and upstream choices of other plugins apply as they do to a miss) to the
upstream they choose.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from multidict import CIMultiDict

from gateway.context import RequestContext
from gateway.errors import GatewayError

from .validators import CONDITIONAL_FIELDS

if TYPE_CHECKING:
    from .entries import Entry


class Fetched:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: CIMultiDict[str], body: bytes | None) -> None:
        self.status = status
        self.headers = headers
        self.body = body  # None when it was larger than the limit (or the response is a 304)


async def fetch(ctx: RequestContext, entry: Entry, limit: int, own_state_key: str) -> Fetched | None:
    """The upstream's answer to a conditional GET for ``ctx``'s target; None if a plugin answered
    instead. Raises ``GatewayError`` when the upstream fails."""
    validators = {}
    if entry.etag is not None:
        validators["If-None-Match"] = entry.etag
    if entry.last_modified is not None:
        validators["If-Modified-Since"] = entry.last_modified
    async with ctx.upstream_request("GET", remove_headers=CONDITIONAL_FIELDS, set_headers=validators,
                                    hide_state=(own_state_key,)) as response:
        if response is None:
            return None
        body = None
        length = response.content_length
        if response.status != 304 and (length is None or length <= limit):
            try:
                body = await response.read(limit)
            except GatewayError:
                body = None
        return Fetched(response.status, CIMultiDict(response.headers), body)
