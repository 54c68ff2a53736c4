"""API versioning for Plugway: which version a request wants, where it goes, and when it retires.

``on_request`` chooses the version (path, header, media type parameter or
query, in the configured order; else the default), refuses unknown (400) and
retired (410) ones, sets ``ctx.version`` for the plugins after it and counts
the request. ``before_upstream`` removes the ``/vN`` segment and sends the
request to the version's upstream, path prefix or headers. ``on_response``
adds ``Deprecation``, ``Sunset`` and ``Link`` to a deprecated version's answers.
The logic is in ``selection`` and ``lifecycle``; this module is the glue.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Literal

from gateway import PluginDeclaration, hookimpl, setting

from . import lifecycle, selection

NAME = "versioning"
_VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_FRAMING = frozenset({"host", "content-length", "transfer-encoding", "connection", "expect", "te", "upgrade"})
Source = Literal["path", "header", "media_type", "query"]


@dataclass(frozen=True)
class VersionSettings:
    upstream: str | None = setting(None, doc="Upstream serving this version (default: the route's).")
    path_prefix: str | None = setting(None, doc='Prepend this to the forwarded path, e.g. "/v1-compat".')
    headers: Mapping[str, str] = setting(
        factory=lambda: MappingProxyType({}),
        doc="Request headers set for the upstream, e.g. { X-API-Version = \"1\" }.",
    )
    deprecated_at: datetime | None = setting(
        None, parse=lifecycle.parse_instant,
        doc="Deprecation date (Deprecation header, RFC 9745); may be in the future.",
    )
    sunset_at: datetime | None = setting(
        None, parse=lifecycle.parse_instant, doc="Retirement date (Sunset header, RFC 8594); 410 Gone from then on.",
    )
    deprecation_link: str | None = setting(
        None, parse=lifecycle.parse_link, doc='Page about the deprecation (Link rel="deprecation").',
    )
    sunset_link: str | None = setting(
        None, parse=lifecycle.parse_link, doc='Page about the sunset (Link rel="sunset").',
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "announcement", lifecycle.announcement(
            self.deprecated_at, self.sunset_at, self.deprecation_link, self.sunset_link,
        ))

    def validate(self) -> Iterator[tuple[str, str]]:
        if self.path_prefix is not None and not re.fullmatch(r"(/[A-Za-z0-9._~!$&'()*+,=:@-]+)+", self.path_prefix):
            yield "path_prefix", f"{self.path_prefix!r} must be a plain path such as /v1-compat"
        for name, value in self.headers.items():
            if not _HEADER_NAME.fullmatch(name) or name.lower() in _FRAMING:
                yield "headers", f"{name!r} is not a header name this plugin may set"
            elif _CONTROL.search(value):
                yield "headers", f"the value of {name!r} has a control character"
        if self.sunset_at is not None and self.deprecated_at is not None and self.sunset_at < self.deprecated_at:
            yield "sunset_at", "is before deprecated_at"


@dataclass(frozen=True)
class VersioningSettings:
    versions: Mapping[str, VersionSettings] = setting(
        doc='The supported versions by name: [plugins.versioning.versions."1"].',
    )
    default: str | None = setting(None, doc="Version used when the request names none (400 when unset).")
    sources: tuple[Source, ...] = setting(
        ("path", "header", "media_type", "query"), doc="Where to look for the version, in order; the first found wins.",
    )
    strip_path: bool = setting(
        True, doc="Remove the /vN segment from the forwarded path when the version came from it.",
    )
    headers: tuple[str, ...] = setting(
        ("API-Version", "Accept-Version", "X-API-Version"), doc="Request headers naming the version, in order.",
    )
    media_type_parameter: str = setting(
        "version", doc="Accept parameter naming the version: application/vnd.acme+json; version=2.",
    )
    query_parameter: str = setting("version", doc="Query parameter naming the version: ?version=2.")

    def __post_init__(self) -> None:
        object.__setattr__(self, "finder", selection.VersionFinder(
            self.sources, self.headers, self.media_type_parameter, self.query_parameter,
            MappingProxyType(selection.version_aliases(self.versions)),
        ))

    def validate(self) -> Iterator[tuple[str, str]]:
        if not self.versions:
            yield "versions", "needs at least one version"
        for name in self.versions:
            if not _VERSION_NAME.fullmatch(name):
                yield "versions", f"{name!r} is not a version name (letters, digits, '.', '_', '-')"
        if self.default is not None and self.default not in self.versions:
            yield "default", f'"{self.default}" is not one of the versions ({", ".join(self.versions)})'
        if len(set(self.sources)) != len(self.sources):
            yield "sources", "names a source twice"
        for name in self.headers:
            if not _HEADER_NAME.fullmatch(name):
                yield "headers", f"{name!r} is not a header name"

    def validate_with(self, gateway_settings) -> Iterator[tuple[str, str]]:
        """Checked by ``plugway check`` against the core configuration: upstreams must exist."""
        known = {upstream.name for upstream in gateway_settings.upstreams}
        for name, version in self.versions.items():
            if version.upstream is not None and version.upstream not in known:
                yield f'versions."{name}".upstream', f'unknown upstream "{version.upstream}"'

    def supported(self, now: datetime) -> list[str]:
        return [name for name, version in self.versions.items() if not lifecycle.retired(version.sunset_at, now)]


@hookimpl
def declare_plugin():
    return PluginDeclaration(settings=VersioningSettings, priority=800)


@hookimpl
def worker_started(gateway):
    metrics = gateway.metrics
    gateway.state[NAME] = {
        "requests": metrics.counter(
            "plugway_versioning_requests_total", "Requests accepted, by route and API version.", ("route", "version"),
            per_request=True,
        ),
        "refused": metrics.counter(
            "plugway_versioning_refused_total",
            "Requests refused, by route and reason (unsupported, missing, retired).",
            ("route", "reason"),
        ),
    }


@hookimpl
def on_request(ctx, settings):
    metrics = ctx.gateway.state[NAME]
    route = ctx.route
    prefix = route.prefix
    after_prefix = None if prefix is None else ctx.path[len(prefix.rstrip("/")):]
    finder = settings.finder
    requested = finder.find(after_prefix, ctx.request.headers, ctx.query)
    now = datetime.now(timezone.utc)
    if requested is None:
        if settings.default is None:
            metrics["refused"].labels(route.name, "missing").inc()
            raise selection.version_required(settings.supported(now))
        name = settings.default
    else:
        name = finder.resolve(requested.value)
        if name is None:
            metrics["refused"].labels(route.name, "unsupported").inc()
            raise selection.unsupported_version(requested.value, settings.supported(now))
    version = settings.versions[name]
    if lifecycle.retired(version.sunset_at, now):
        metrics["refused"].labels(route.name, "retired").inc()
        raise selection.version_retired(
            name, lifecycle.http_date(version.sunset_at), settings.supported(now), version.announcement,
        )
    ctx.version = name
    ctx.state[NAME] = requested
    metrics["requests"].labels(route.name, name).inc()


@hookimpl
def before_upstream(ctx, settings, outgoing):
    version = settings.versions.get(ctx.version)
    if version is None:
        return
    requested = ctx.state.get(NAME)
    if settings.strip_path and requested is not None and requested.source == "path":
        outgoing.path = selection.strip_segment(outgoing.path, requested)
    if version.path_prefix is not None:
        outgoing.path = selection.prefixed(version.path_prefix, outgoing.path)
    if version.upstream is not None:
        outgoing.upstream_name = version.upstream
    if version.headers:
        headers = outgoing.headers
        for name, value in version.headers.items():
            headers[name] = value


@hookimpl
def on_response(ctx, settings, response):
    version = settings.versions.get(ctx.version)
    if version is not None and version.announcement:
        headers = response.headers
        for name, value in version.announcement:
            headers.add(name, value)
