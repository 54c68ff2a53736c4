"""The one object every hook of a request receives."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiohttp.web_request import BaseRequest

    from .routing import Route
    from .upstream import Target, Upstream


@dataclass(frozen=True)
class Consumer:
    """Who is calling, as an auth plugin established it."""

    id: str
    roles: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    claims: Mapping[str, Any] = field(default_factory=dict)
    anonymous: bool = False  # let in without credentials (per-caller limits then key on the address)


class RequestContext:
    """Everything known about one request while it goes through the gateway.

    Read-only for plugins unless said otherwise:

    - ``request``: the aiohttp request (method, headers, body stream).
    - ``method``, ``host`` (lower-case, no port), ``path`` (canonical, see
      ``gateway.paths``), ``query`` (raw, without ``?``), ``path_params``.
    - ``route``: the matched ``Route``; ``upstream`` and ``target`` once chosen.
    - ``failed_tries``: the tries the core retried on another target, in order, as
      ``(target URL, error code or status)`` pairs, e.g. ``("http://10.0.0.2:80",
      "upstream_unreachable")`` or ``(..., "503")``; ``target`` is the last try's.
    - ``client_ip``: the client address, derived through ``trusted_proxies``;
      ``peer_ip``: the address of the socket peer.
    - ``scheme``: "https" or "http" as the client used it: the listener's, or what a
      trusted proxy said in ``X-Forwarded-Proto``; ``listener_scheme``: this hop's.
    - ``request_id``: sent upstream and back to the client.
    - ``consumer``: set by an auth plugin (writable), or None.
    - ``version``: the API version a versioning plugin chose (writable), or None.
    - ``avoid_targets``: URLs of targets this request must not go to (writable, a
      frozenset; e.g. those whose circuit breaker is open). The balancer skips them on every
      try, in panic mode too; when they leave no target, the answer is 503.
    - ``state``: a dict for plugins to share per-request data (writable);
      key it by your plugin's name.
    - ``log``: extra fields for the access log line (writable).

    ``body_chunks()`` and ``read_body()`` read the client's body within the gateway's
    size and time limits (see ``gateway.proxy.body_chunks``). ``upstream_request()`` sends a
    request of the plugin's own to the route's upstream (see ``gateway.pipeline.upstream_request``).
    """

    __slots__ = (
        "request", "gateway", "method", "host", "path", "query", "path_params", "route", "upstream", "target",
        "client_ip", "peer_ip", "peer_trusted", "scheme", "listener_scheme", "request_id", "consumer", "version", "state",
        "log", "started", "method_refusal", "avoid_targets", "failed_tries",
        "status", "bytes_in", "bytes_out", "upstream_seconds", "error",
    )

    def __init__(self, request: BaseRequest, gateway: Any, started: float) -> None:
        self.request = request
        self.gateway = gateway
        self.started = started
        self.method = request.method
        self.host = ""
        self.path = ""
        self.query = ""
        self.path_params: dict[str, str] = {}
        self.route: Route | None = None
        self.upstream: Upstream | None = None
        self.target: Target | None = None
        self.failed_tries: tuple[tuple[str, str], ...] = ()
        self.client_ip = ""
        self.peer_ip = ""
        self.peer_trusted = False
        self.scheme = "http"
        self.listener_scheme = "http"
        self.method_refusal: Exception | None = None
        self.request_id = ""
        self.consumer: Consumer | None = None
        self.version: str | None = None
        self.avoid_targets: frozenset[str] = frozenset()
        self.state: dict[str, Any] = {}
        self.log: dict[str, Any] = {}
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.upstream_seconds: float | None = None
        self.error: Exception | None = None

    def body_chunks(self, limit: int | None = None):
        from .proxy import body_chunks

        return body_chunks(self, limit)

    async def read_body(self, limit: int | None = None) -> bytes:
        from .proxy import read_body

        return await read_body(self, limit)

    def upstream_request(self, method: str = "GET", **changes: Any):
        from .pipeline import upstream_request

        return upstream_request(self, method, **changes)

    def subrequest(self, method: str) -> RequestContext:
        """A context for a request of a plugin's own on behalf of this one: the same client,
        route, path, identity and version, a copy of ``state``, nothing sent yet."""
        sub = RequestContext(self.request, self.gateway, self.started)
        for name in _SHARED_WITH_SUBREQUESTS:
            setattr(sub, name, getattr(self, name))
        sub.method = method
        sub.state = dict(self.state)
        return sub


_SHARED_WITH_SUBREQUESTS = ("host", "path", "query", "path_params", "route", "client_ip", "peer_ip", "peer_trusted",
                            "scheme", "listener_scheme", "request_id", "consumer", "version", "avoid_targets")
