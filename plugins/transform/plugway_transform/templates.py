"""Value templates over the request: ``"tenant-{header.X-Tenant}"``, ``"{consumer.id}"``, ``"{version}"``.

A template is compiled once, at configuration time, into literal text and
references; an unknown reference is a configuration error. ``{{`` and ``}}``
are literal braces. References:

=====================  =========================================================
``{consumer.id}``      the id an auth plugin gave the caller
``{claim.NAME}``       a string or number claim of that consumer
``{header.NAME}``      the client's request header (first value); the headers
                       only the gateway may set (identity, forwarding, request
                       id) are never read from the client
``{path.NAME}``        a path parameter of the route (``path = "/users/{id}"``)
``{query.NAME}``       a query parameter of the request, decoded (first value)
``{version}``          the API version chosen by the versioning plugin
``{method}``, ``{host}``, ``{route}``, ``{request_id}``, ``{client_ip}``
``{match.N}``          in ``path_replace`` only: a group of ``path_pattern``
                       (by number or name)
=====================  =========================================================

A template that refers to a value the request does not have renders to None,
and the operation using it is skipped (no header, no field, no rewrite).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

_NAMED = ("consumer", "claim", "header", "path", "query", "match")
_BARE = ("version", "method", "host", "route", "request_id", "client_ip")
_REFERENCE = re.compile(r"([a-z_]+)(?:\.([A-Za-z0-9_.\-]+))?")


class TemplateError(ValueError):
    pass


@dataclass(frozen=True)
class Reference:
    kind: str
    name: str = ""


@dataclass(frozen=True)
class Template:
    """Literal strings and ``Reference``s, in order."""

    parts: tuple[str | Reference, ...]

    @property
    def literal(self) -> str | None:
        """The text when the template refers to nothing, else None."""
        if all(isinstance(part, str) for part in self.parts):
            return "".join(self.parts)
        return None

    @property
    def references(self) -> tuple[Reference, ...]:
        return tuple(part for part in self.parts if isinstance(part, Reference))

    def render(self, values: RequestValues, escape: Callable[[str], str] | None = None) -> str | None:
        """The text, or None when a referenced value is missing; ``escape`` is applied to request
        values (never to literal text nor to ``{match.N}`` groups, which come from the path)."""
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            value = values.get(part)
            if value is None:
                return None
            out.append(escape(value) if escape is not None and part.kind != "match" else value)
        return "".join(out)


def compile_template(text: str, *, allow_match: bool = False) -> Template:
    parts: list[str | Reference] = []
    literal: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char in "{}" and text[index + 1:index + 2] == char:
            literal.append(char)
            index += 2
            continue
        if char == "}":
            raise TemplateError(f"{text!r}: a lone '}}' (write '}}}}' for a literal brace)")
        if char != "{":
            literal.append(char)
            index += 1
            continue
        end = text.find("}", index)
        if end < 0:
            raise TemplateError(f"{text!r}: an unclosed '{{' (write '{{{{' for a literal brace)")
        if literal:
            parts.append("".join(literal))
            literal = []
        parts.append(_reference(text[index + 1:end], text, allow_match))
        index = end + 1
    if literal:
        parts.append("".join(literal))
    return Template(tuple(parts))


def _reference(inner: str, text: str, allow_match: bool) -> Reference:
    found = _REFERENCE.fullmatch(inner)
    kind, name = (found.group(1), found.group(2) or "") if found else ("", "")
    if kind in _BARE and not name:
        return Reference(kind)
    if kind == "consumer" and name == "id" or kind in _NAMED and kind != "consumer" and name:
        if kind == "match" and not allow_match:
            raise TemplateError(f"{text!r}: {{match.N}} is only available in path_replace")
        return Reference(kind, name)
    known = ", ".join(["{consumer.id}", "{claim.NAME}", "{header.NAME}", "{path.NAME}", "{query.NAME}"]
                      + [f"{{{bare}}}" for bare in _BARE])
    raise TemplateError(f"{text!r}: unknown reference {{{inner}}} (known: {known})")


class RequestValues:
    """What templates may read from one request, looked up on demand.

    ``protected`` holds the lower-case names of the request headers a client may not
    supply (the gateway sets or drops them); ``match`` is the path pattern's match.
    """

    __slots__ = ("ctx", "protected", "match", "_query")

    def __init__(self, ctx: Any, protected: frozenset[str]) -> None:
        self.ctx = ctx
        self.protected = protected
        self.match: re.Match[str] | None = None
        self._query: dict[str, str] | None = None

    def get(self, reference: Reference) -> str | None:
        value = self._lookup(reference)
        if value is None or value.isascii():
            return value
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # bytes that were not UTF-8 (aiohttp keeps them as surrogates): "?"
            return value.encode("utf-8", "replace").decode("utf-8")
        return value

    def _lookup(self, reference: Reference) -> str | None:
        kind, name, ctx = reference.kind, reference.name, self.ctx
        if kind == "header":
            return None if name.lower() in self.protected else ctx.request.headers.get(name)
        if kind == "path":
            return ctx.path_params.get(name)
        if kind == "query":
            return self._query_values().get(name)
        if kind == "consumer":
            return ctx.consumer.id if ctx.consumer is not None else None
        if kind == "claim":
            return _claim(ctx.consumer, name)
        if kind == "match":
            return self._group(name)
        if kind == "route":
            return ctx.route.name
        return getattr(ctx, kind)  # version, method, host, request_id, client_ip

    def _query_values(self) -> dict[str, str]:
        if self._query is None:
            self._query = {}
            for key, value in parse_qsl(self.ctx.query, keep_blank_values=True):
                self._query.setdefault(key, value)
        return self._query

    def _group(self, name: str) -> str | None:
        if self.match is None:
            return None
        try:
            return self.match.group(int(name) if name.isdigit() else name) or ""
        except IndexError:
            return None


def _claim(consumer: Any, name: str) -> str | None:
    if consumer is None:
        return None
    value = consumer.claims.get(name)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    return str(value)
