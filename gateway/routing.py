"""The route table: which configured route serves a (host, canonical path, method).

Matching rules, in the spirit of nginx locations and Kong routes:

- ``prefix`` is segment-aware: ``/api/users`` matches ``/api/users`` and
  ``/api/users/...`` but never ``/api/usersX``. ``path`` is a template whose
  ``{name}`` placeholders match exactly one segment each.
- ``hosts`` match the Host header without its port, case-insensitively;
  ``*.example.com`` matches exactly one more label. A route without hosts
  serves any host.
- Among the routes that match, the most specific wins: a route with hosts
  before one without, then the longest literal path, then a template before
  a prefix of the same length, then the order in the file.
- A route that allows GET also serves HEAD.
- When routes match the path but none allows the method, the answer is 405
  with ``Allow`` listing the methods those routes accept.

Routing always sees the canonical path (``gateway.paths``), never the raw one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config.model import RouteSettings
from .errors import MethodNotAllowed, RouteNotFound
from .paths import PLACEHOLDER, canonical_path, decode_segment
from .plugins import EMPTY_CHAIN, Chain

if TYPE_CHECKING:
    from .upstream import Upstream

@dataclass(eq=False)
class Route:
    """One route as the worker uses it: settings plus what was compiled from them
    (the path matcher, its plugin chain and its upstream).

    Plugins may read ``name``, ``settings``, ``prefix`` (the canonical prefix of a prefix
    route, without a trailing slash; None for a template route) and ``upstream``.
    """

    settings: RouteSettings
    index: int
    methods: frozenset[str]
    hosts: tuple[str, ...]
    literal_length: int
    prefix: str | None = None
    template: re.Pattern[str] | None = None
    chain: Chain = EMPTY_CHAIN
    upstream: Upstream | None = None

    @property
    def name(self) -> str:
        return self.settings.name

    def match_path(self, path: str) -> dict[str, str] | None:
        """Path parameters ({} for a prefix route) if ``path`` belongs to this route."""
        prefix = self.prefix
        if prefix is not None:
            if path.startswith(prefix) and (
                len(path) == len(prefix) or path[len(prefix)] == "/" or prefix.endswith("/")
            ):
                return {}
            return None
        found = self.template.fullmatch(path)
        if found is None:
            return None
        return {name: decode_segment(value) for name, value in found.groupdict().items()}

    def match_host(self, host: str) -> bool:
        if not self.hosts:
            return True
        for pattern in self.hosts:
            if pattern.startswith("*."):
                head, dot, tail = host.partition(".")
                if dot and head and tail == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False

    def upstream_path(self, path: str) -> str:
        """The path to forward: ``path`` with the prefix removed when strip_prefix is set."""
        if not self.settings.strip_prefix:
            return path
        rest = path[len(self.prefix.rstrip("/")):]
        return rest if rest.startswith("/") else "/" + rest

    @property
    def specificity(self) -> tuple[int, int, int, int]:
        host_rank = 0 if not self.hosts else 1 if any(h.startswith("*.") for h in self.hosts) else 2
        return host_rank, self.literal_length, self.template is not None, -self.index


def compile_route(settings: RouteSettings, index: int) -> Route:
    hosts = tuple(host.lower() for host in settings.hosts)
    methods = frozenset(settings.methods)
    if settings.prefix is not None:
        prefix = canonical_path(settings.prefix)
        if prefix != "/" and prefix.endswith("/"):
            prefix = prefix.rstrip("/")
        return Route(settings, index, methods, hosts, len(prefix), prefix=prefix)
    template = settings.path
    pattern = "".join(
        f"(?P<{part}>[^/]+)" if i % 2 else re.escape(part)
        for i, part in enumerate(PLACEHOLDER.split(template))
    )
    literal = len(PLACEHOLDER.sub("", template))
    return Route(settings, index, methods, hosts, literal, template=re.compile(pattern))


class Router:
    """Routes sorted by specificity; ``match`` returns the route for a request."""

    def __init__(self, routes: list[Route]) -> None:
        self.routes = sorted(routes, key=lambda route: route.specificity, reverse=True)
        self.lenient = any(r.settings.keep_encoded_slashes or r.settings.allow_semicolons for r in routes)

    def match(self, host: str, path: str, method: str) -> tuple[Route, dict[str, str]]:
        allowed: set[str] = set()
        first: tuple[Route, dict[str, str]] | None = None
        for route in self.routes:
            if not route.match_host(host):
                continue
            params = route.match_path(path)
            if params is None:
                continue
            if not route.methods or method in route.methods or method == "HEAD" and "GET" in route.methods:
                return route, params
            allowed |= route.methods
            first = first or (route, params)
        if first is not None:
            if "GET" in allowed:
                allowed.add("HEAD")
            raise MethodNotAllowed(sorted(allowed), *first)
        raise RouteNotFound()


def request_host(host_header: str | None) -> str:
    """The Host header, lower-cased, without port or trailing dot."""
    if not host_header:
        return ""
    host = host_header.lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.partition(":")[0].rstrip(".")
