"""Which API version a request asks for, and the refusals when it cannot be served.

Pure functions over the request's parts (the path after the route's prefix,
the headers, the raw query), so they can be tested without a gateway.

A version is named in the configuration ("1", "2", "2024-06"); clients may
write it as configured or with a leading "v" ("v2"). In the path it is a
whole segment right after the route's prefix: ``/v2/...``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl

from gateway.errors import GatewayError

SOURCES = ("path", "header", "media_type", "query")
# A path segment that looks like a version even when it names none we know: "/v3/..." is refused
# with the list of supported versions instead of being forwarded as an ordinary path.
_VERSION_LIKE = re.compile(r"[vV][0-9][A-Za-z0-9._-]*")
_ECHO_LIMIT = 64


class UnsupportedVersion(GatewayError):
    status, code = 400, "unsupported_version"


class VersionRequired(GatewayError):
    status, code = 400, "version_required"


class VersionRetired(GatewayError):
    status, code = 410, "version_retired"


@dataclass(frozen=True)
class Requested:
    """What the request said: the raw value, where it was found and, for the path, the
    version segment (``/v2``) and what follows it (``/users``), so it can be removed later."""

    value: str
    source: str
    segment: str = ""
    rest: str = ""


@dataclass(frozen=True)
class VersionFinder:
    """Looks for a version in the configured sources, in order; the first found wins."""

    sources: tuple[str, ...]
    header_names: tuple[str, ...]
    media_type_parameter: str
    query_parameter: str
    aliases: Mapping[str, str]

    def find(self, after_prefix: str | None, headers: Mapping[str, str], query: str) -> Requested | None:
        for source in self.sources:
            if source == "path":
                found = self._in_path(after_prefix)
            elif source == "header":
                found = self._in_headers(headers)
            elif source == "media_type":
                found = self._in_accept(headers.get("Accept"))
            else:
                found = self._in_query(query)
            if found is not None:
                return found
        return None

    def resolve(self, value: str) -> str | None:
        """The configured name a client's spelling stands for, or None."""
        return self.aliases.get(value)

    def _in_path(self, after_prefix: str | None) -> Requested | None:
        if not after_prefix or not after_prefix.startswith("/"):
            return None
        segment = after_prefix[1:].split("/", 1)[0]
        if segment in self.aliases and segment[:1] in ("v", "V") or _VERSION_LIKE.fullmatch(segment):
            return Requested(segment, "path", "/" + segment, after_prefix[len(segment) + 1:])
        return None

    def _in_headers(self, headers: Mapping[str, str]) -> Requested | None:
        for name in self.header_names:
            value = headers.get(name)
            if value is not None and value.strip():
                return Requested(value.strip(), "header")
        return None

    def _in_accept(self, accept: str | None) -> Requested | None:
        if not accept:
            return None
        wanted = self.media_type_parameter.lower()
        for media_range in accept.split(","):
            for parameter in media_range.split(";")[1:]:
                name, _, value = parameter.partition("=")
                if name.strip().lower() == wanted and value.strip().strip('"'):
                    return Requested(value.strip().strip('"'), "media_type")
        return None

    def _in_query(self, query: str) -> Requested | None:
        if not query:
            return None
        for name, value in parse_qsl(query, keep_blank_values=False):
            if name == self.query_parameter:
                return Requested(value.strip(), "query")
        return None


def version_aliases(names: Iterable[str]) -> dict[str, str]:
    """Every spelling a client may use for each configured name: "2", "v2", "V2"."""
    aliases = {}
    for name in names:
        aliases.setdefault(f"v{name}", name)
        aliases.setdefault(f"V{name}", name)
    aliases.update({name: name for name in names})
    return aliases


def unsupported_version(value: str, supported: Iterable[str]) -> UnsupportedVersion:
    shown = value if len(value) <= _ECHO_LIMIT else value[:_ECHO_LIMIT] + "..."
    return UnsupportedVersion(f'API version "{shown}" is not supported; supported versions: {_listed(supported)}')


def version_required(supported: Iterable[str]) -> VersionRequired:
    return VersionRequired(f"this API needs a version; supported versions: {_listed(supported)}")


def version_retired(
    name: str, sunset: str, supported: Iterable[str], headers: Iterable[tuple[str, str]],
) -> VersionRetired:
    return VersionRetired(
        f'API version "{name}" was retired on {sunset}; supported versions: {_listed(supported)}', headers=headers,
    )


def _listed(names: Iterable[str]) -> str:
    return ", ".join(names) or "none"


def strip_segment(forwarded: str, requested: Requested) -> str:
    """``forwarded`` without the version segment, wherever the route's strip_prefix left it.

    The segment is followed by ``requested.rest`` at the end of the forwarded path, whether or
    not the route's prefix was stripped; a path some other plugin rewrote is left alone.
    """
    tail = requested.segment + requested.rest
    if not requested.segment or not forwarded.endswith(tail):
        return forwarded
    return forwarded[: len(forwarded) - len(tail)] + requested.rest or "/"


def prefixed(prefix: str, path: str) -> str:
    return prefix.rstrip("/") + path
