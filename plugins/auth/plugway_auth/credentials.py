"""Where credentials come from in a request, and how to take them out before the upstream.

Token sources: ``bearer`` (``Authorization: Bearer``), ``header:NAME``, ``cookie:NAME``,
``query:NAME`` and ``subprotocol``. Browsers cannot set headers on a WebSocket handshake,
so a token may be offered as a WebSocket subprotocol ``bearer.<token>`` (a JWT is made of
token characters, so it is a valid subprotocol name), next to the application's real
subprotocols: ``new WebSocket(url, ["bearer." + token, "chat.v1"])``. That entry is
removed from ``Sec-WebSocket-Protocol`` before the request goes upstream, so the
upstream picks among the real ones and never sees the token.

A request presenting more than one distinct credential (two Authorization headers, a token
and an API key...) is refused: which one counts would otherwise depend on the order of checks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote_plus

from multidict import CIMultiDict

SUBPROTOCOL_PREFIX = "bearer."
KINDS = ("bearer", "subprotocol", "header", "cookie", "query")


@dataclass(frozen=True)
class Source:
    kind: str
    name: str = ""

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}" if self.name else self.kind


def parse_source(raw: object) -> Source:
    text = raw if isinstance(raw, str) else ""
    kind, _, name = text.partition(":")
    if kind in ("bearer", "subprotocol") and not name:
        return Source(kind)
    if kind in ("header", "cookie", "query") and name and all(c.isalnum() or c in "-_." for c in name):
        return Source(kind, name)
    raise ValueError(f"{raw!r} is not a credential source: bearer, subprotocol, header:NAME, cookie:NAME or query:NAME")


def parse_sources(raw: object) -> tuple[Source, ...]:
    if not isinstance(raw, list):
        raise ValueError("must be an array of sources")
    return tuple(parse_source(item) for item in raw)


def render_sources(sources: tuple[Source, ...]) -> list[str]:
    return [str(source) for source in sources]


def values(source: Source, headers: Mapping[str, str], query: str) -> list[str]:
    """Every non-empty value the source finds (several when the client repeated it)."""
    found: list[str] = []
    if source.kind == "bearer":
        for value in headers.getall("Authorization", ()):
            scheme, _, rest = value.strip().partition(" ")
            if scheme.lower() == "bearer":
                found.append(rest.strip())
    elif source.kind == "header":
        found = [value.strip() for value in headers.getall(source.name, ())]
    elif source.kind == "cookie":
        for value in headers.getall("Cookie", ()):
            for pair in value.split(";"):
                name, sep, cookie = pair.strip().partition("=")
                if sep and name == source.name:
                    found.append(cookie.strip())
    elif source.kind == "query":
        if query:
            for pair in query.split("&"):
                name, _, value = pair.partition("=")
                if unquote_plus(name) == source.name:
                    found.append(unquote_plus(value))
    else:
        for value in headers.getall("Sec-WebSocket-Protocol", ()):
            for item in value.split(","):
                item = item.strip()
                if item.startswith(SUBPROTOCOL_PREFIX):
                    found.append(item[len(SUBPROTOCOL_PREFIX):])
    return [value for value in found if value]


def presented(
    headers: Mapping[str, str], query: str, token_sources: Iterable[Source], key_sources: Iterable[Source],
) -> list[tuple[str, str]]:
    """The distinct credentials in a request, as ("jwt" | "api_key", value)."""
    found: list[tuple[str, str]] = []
    for kind, sources in (("jwt", token_sources), ("api_key", key_sources)):
        for source in sources:
            for value in values(source, headers, query):
                if (kind, value) not in found:
                    found.append((kind, value))
    return found


def remove(source: Source, headers: CIMultiDict[str], query: str) -> str:
    """Take the source's credentials out of the outgoing headers; returns the new query."""
    if source.kind == "bearer":
        kept = [value for value in headers.getall("Authorization", ())
                if value.strip().partition(" ")[0].lower() != "bearer"]
        _replace(headers, "Authorization", kept)
    elif source.kind == "header":
        headers.popall(source.name, None)
    elif source.kind == "cookie":
        kept = []
        for value in headers.getall("Cookie", ()):
            pairs = [pair.strip() for pair in value.split(";")]
            rest = [pair for pair in pairs if pair and pair.partition("=")[0] != source.name]
            if rest:
                kept.append("; ".join(rest))
        _replace(headers, "Cookie", kept)
    elif source.kind == "query":
        return "&".join(pair for pair in query.split("&") if unquote_plus(pair.partition("=")[0]) != source.name)
    else:
        kept = []
        for value in headers.getall("Sec-WebSocket-Protocol", ()):
            items = [item.strip() for item in value.split(",")]
            rest = [item for item in items if item and not item.startswith(SUBPROTOCOL_PREFIX)]
            if rest:
                kept.append(", ".join(rest))
        _replace(headers, "Sec-WebSocket-Protocol", kept)
    return query


def _replace(headers: CIMultiDict[str], name: str, values: list[str]) -> None:
    headers.popall(name, None)
    for value in values:
        headers.add(name, value)
