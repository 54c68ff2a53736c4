"""CORS decisions (the Fetch standard's CORS protocol), from header values in to header values out.

- ``Origins``: the allowed origins, compiled once: exact serialized origins
  (``https://app.example.com``, ``null``), patterns whose ``*`` stands for
  exactly one DNS label (``https://*.example.com`` matches
  ``https://a.example.com``, never ``https://example.com``,
  ``https://a.b.example.com`` nor ``https://evil.com?.example.com``), or
  ``*`` for any origin.
- ``Policy``: everything a route's settings say, with the header values
  precomputed, and the two answers: ``preflight`` (the headers for a
  preflight, or ``Refused``) and ``actual`` (the headers for a response).

Nothing here reads sockets or aiohttp objects; the plugin's hooks pass header
values in and set the headers that come out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST = rf"(?:{_LABEL}\.)*{_LABEL}|\[[0-9a-f:.]+\]"
_ORIGIN = re.compile(rf"(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<wild>\*\.)?(?P<host>{_HOST})(?P<port>:[0-9]{{1,5}})?")
# Headers of the CORS protocol that only this plugin may set on a route it serves.
CORS_RESPONSE_HEADERS = (
    "Access-Control-Allow-Origin", "Access-Control-Allow-Credentials", "Access-Control-Allow-Methods",
    "Access-Control-Allow-Headers", "Access-Control-Expose-Headers", "Access-Control-Max-Age",
)


class Refused(Exception):
    """A preflight this policy does not allow; the message says which part."""


class Origins:
    """The ``allow_origins`` setting, compiled."""

    __slots__ = ("entries", "any", "exact", "pattern")

    def __init__(self, entries: Iterable[str] = ()) -> None:
        self.entries = tuple(entries)
        self.any = "*" in self.entries
        self.exact = frozenset(entry for entry in self.entries if "*" not in entry)
        patterns = [_pattern(entry) for entry in self.entries if "*" in entry and entry != "*"]
        self.pattern = re.compile("|".join(patterns)) if patterns else None

    @classmethod
    def parse(cls, raw: object) -> Origins:
        """From a TOML array of strings; ValueError says what is wrong with which entry."""
        if not isinstance(raw, list) or not raw:
            raise ValueError('must be a non-empty array of origins, such as ["https://app.example.com"]')
        for index, entry in enumerate(raw):
            problem = _origin_problem(entry)
            if problem:
                raise ValueError(f"entry {index} ({entry!r}) {problem}")
        if "*" in raw and len(raw) > 1:
            raise ValueError('"*" already allows every origin: remove the other entries or the "*"')
        return cls(raw)

    def render(self) -> list[str]:
        return list(self.entries)

    def allows(self, origin: str) -> bool:
        return self.any or origin in self.exact or self.pattern is not None and self.pattern.fullmatch(origin) is not None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Origins) and other.entries == self.entries

    def __hash__(self) -> int:
        return hash(self.entries)

    def __repr__(self) -> str:
        return f"Origins({list(self.entries)!r})"


def _origin_problem(entry: object) -> str | None:
    if not isinstance(entry, str):
        return "must be a string"
    if entry in ("*", "null"):
        return None
    if entry != entry.lower():
        return "must be lower-case, as browsers serialize origins"
    match = _ORIGIN.fullmatch(entry)
    if match is None:
        return ('is not an origin: write scheme://host[:port] with no path, such as "https://app.example.com", '
                'or "https://*.example.com" for one label')
    if match["wild"] and "." not in match["host"]:
        return "would match every origin under a top-level domain"
    return None


def _pattern(entry: str) -> str:
    head, _, tail = entry.partition("*")
    return f"(?:{re.escape(head)}{_LABEL}{re.escape(tail)})"


class Policy:
    """One route's CORS settings, with the header values precomputed, ready to answer requests."""

    __slots__ = ("origins", "methods", "method_list", "headers", "expose", "credentials", "max_age", "varies")

    def __init__(
        self, origins: Origins, methods: Iterable[str], headers: Iterable[str], expose: Iterable[str],
        credentials: bool, max_age_seconds: int,
    ) -> None:
        methods, headers = tuple(methods), tuple(headers)
        self.origins = origins
        self.methods = None if "*" in methods else frozenset(methods)  # None: any method, reflected
        self.method_list = ", ".join(methods)
        self.headers = None if "*" in headers else frozenset(h.lower() for h in headers)  # None: reflected
        self.expose = ", ".join(expose)
        self.credentials = credentials
        self.max_age = str(max_age_seconds) if max_age_seconds else ""
        # Whether the answer depends on Origin, so that caches must keep answers apart (Vary: Origin).
        self.varies = not origins.any or credentials

    def allow_origin(self, origin: str) -> str:
        return "*" if self.origins.any and not self.credentials else origin

    def preflight(self, origin: str, method: str, requested: str | None) -> list[tuple[str, str]]:
        """The headers of a successful preflight answer; ``Refused`` if it is not allowed."""
        if not self.origins.allows(origin):
            raise Refused("the origin is not allowed")
        if not TOKEN.fullmatch(method) or self.methods is not None and method not in self.methods:
            raise Refused("the method is not allowed")
        names = [name.strip().lower() for name in (requested or "").split(",") if name.strip()]
        for name in names:
            if not TOKEN.fullmatch(name):
                raise Refused("Access-Control-Request-Headers is malformed")
            if self.headers is not None and name not in self.headers:
                raise Refused(f"the request header {name} is not allowed")
        answer = [("Access-Control-Allow-Origin", self.allow_origin(origin))]
        if self.credentials:
            answer.append(("Access-Control-Allow-Credentials", "true"))
        answer.append(("Access-Control-Allow-Methods", method if self.methods is None else self.method_list))
        if names:
            answer.append(("Access-Control-Allow-Headers", ", ".join(names)))
        if self.max_age:
            answer.append(("Access-Control-Max-Age", self.max_age))
        vary = ["Origin"] if self.varies else []
        if self.methods is None:
            vary.append("Access-Control-Request-Method")
        if self.headers is None:
            vary.append("Access-Control-Request-Headers")
        if vary:
            answer.append(("Vary", ", ".join(vary)))
        return answer

    def actual(self, origin: str, method: str) -> list[tuple[str, str]]:
        """The CORS headers of a response to an actual request (none when it is not allowed)."""
        if not self.origins.allows(origin) or self.methods is not None and method not in self.methods:
            return []
        answer = [("Access-Control-Allow-Origin", self.allow_origin(origin))]
        if self.credentials:
            answer.append(("Access-Control-Allow-Credentials", "true"))
        if self.expose:
            answer.append(("Access-Control-Expose-Headers", self.expose))
        return answer



def list_problem(values: tuple[str, ...], what: str) -> str | None:
    """Why a list of methods or header names is not valid, or None: tokens, or "*" alone."""
    if "*" in values:
        return None if len(values) == 1 else f'"*" already allows every {what}: remove the others or the "*"'
    bad = [value for value in values if not TOKEN.fullmatch(value)]
    return f"{bad[0]!r} is not a valid {what}" if bad else None
