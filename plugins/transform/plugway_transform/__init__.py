"""Request and response transformation for Plugway: headers, query, path, status and JSON body fields.

Rules are tables in ``[[plugins.transform.request]]`` and
``[[plugins.transform.response]]``, applied in order; each may be scoped to
API versions (``ctx.version``, set by the versioning plugin), response rules
also to statuses. The logic is in ``rules``, ``transformer``, ``templates``,
``jsonfields``, ``querystring`` and ``bodies``; this module is the glue.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Literal

from gateway import PluginDeclaration, Size, hookimpl, setting

from .rules import compile_rule
from .transformer import FORWARDING_HEADERS, TransformState, transform_request, transform_response

NAME = "transform"


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


def _json_table(raw: Any) -> Mapping[str, Any]:
    """A table of dotted field paths to JSON values (strings are templates)."""
    if not isinstance(raw, Mapping):
        raise ValueError("must be a table of field paths to values, such as { \"meta.source\" = \"gateway\" }")
    for path, value in raw.items():
        _check_json(value, path)
    return MappingProxyType(dict(raw))


def _check_json(value: Any, path: str) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_json(item, f"{path}.{key}")
    elif isinstance(value, list):
        for item in value:
            _check_json(item, path)
    elif not isinstance(value, (str, int, float, bool)):
        raise ValueError(f"{path}: {type(value).__name__} values cannot be put into JSON")


@dataclass(frozen=True)
class MessageRule:
    """What request and response rules share: version scope, headers and JSON body fields."""

    versions: tuple[str, ...] = setting((), doc="Apply only when ctx.version is one of these; empty: always.")
    add_headers: Mapping[str, str] = setting(factory=_empty, doc="Headers added when absent (values are templates).")
    set_headers: Mapping[str, str] = setting(factory=_empty, doc="Headers set, replacing any (values are templates).")
    remove_headers: tuple[str, ...] = setting((), doc="Headers removed.")
    rename_headers: Mapping[str, str] = setting(factory=_empty, doc="Headers renamed: { Old-Name = \"New-Name\" }.")
    set_body: Mapping[str, Any] = setting(
        factory=_empty, parse=_json_table, doc="JSON fields set by dotted path; string values are templates.",
    )
    remove_body: tuple[str, ...] = setting((), doc="JSON fields removed, by dotted path (items.*.secret).")
    rename_body: Mapping[str, str] = setting(factory=_empty, doc="JSON fields renamed: { name = \"full_name\" }.")

    is_request: ClassVar[bool] = False

    def __post_init__(self) -> None:
        compiled, problems = compile_rule(self, request=self.is_request)
        object.__setattr__(self, "compiled", compiled)
        object.__setattr__(self, "problems", tuple(problems))

    def validate(self) -> Iterator[tuple[str, str]]:
        yield from self.problems


@dataclass(frozen=True)
class RequestRule(MessageRule):
    add_query: Mapping[str, str] = setting(factory=_empty, doc="Query parameters added when absent (templates).")
    set_query: Mapping[str, str] = setting(factory=_empty, doc="Query parameters set, replacing any (templates).")
    remove_query: tuple[str, ...] = setting((), doc="Query parameters removed.")
    rename_query: Mapping[str, str] = setting(factory=_empty, doc="Query parameters renamed.")
    path_pattern: str | None = setting(None, doc="Regular expression searched in the forwarded path.")
    path_replace: str | None = setting(None, doc="The new path when path_pattern matches; {match.N} are its groups.")

    is_request: ClassVar[bool] = True


@dataclass(frozen=True)
class ResponseRule(MessageRule):
    statuses: tuple[int, ...] = setting((), doc="Apply only to responses with these statuses; empty: any.")
    set_status: int | None = setting(None, doc="Replace the status (the reason phrase follows it).")


@dataclass(frozen=True)
class TransformSettings:
    request: tuple[RequestRule, ...] = setting((), doc="Request rules, in order: [[plugins.transform.request]].")
    response: tuple[ResponseRule, ...] = setting((), doc="Response rules, in order: [[plugins.transform.response]].")
    max_body: Size = setting(Size("1MiB"), doc="Largest JSON body transformed; larger ones stream through untouched.")
    on_invalid: Literal["reject", "pass"] = setting(
        "reject", doc="A client body that is not JSON where a body rule applies: 400 (reject) or forwarded (pass).",
    )
    compressed: Literal["transform", "pass"] = setting(
        "transform",
        doc="gzip/deflate JSON bodies: decompress, transform, compress again (transform), or leave them (pass).",
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "request_rules", tuple(rule.compiled for rule in self.request))
        object.__setattr__(self, "response_rules", tuple(rule.compiled for rule in self.response))


@hookimpl
def declare_plugin():
    return PluginDeclaration(settings=TransformSettings, priority=700)


@hookimpl
def worker_started(gateway):
    server = gateway.settings.server
    protected = {name.lower() for name in server.identity_headers}
    protected.update(FORWARDING_HEADERS)
    protected.add(server.request_id_header.lower())
    metrics = gateway.metrics
    gateway.state[NAME] = TransformState(
        protected=frozenset(protected),
        skipped=metrics.counter(
            "plugway_transform_skipped_total",
            "Bodies a body rule applied to but that passed untouched, by direction and reason.",
            ("direction", "reason"), per_request=True,
        ),
        transformed=metrics.counter(
            "plugway_transform_bodies_total", "JSON bodies changed, by direction.", ("direction",), per_request=True,
        ),
    )


@hookimpl
def before_upstream(ctx, settings, outgoing):
    rules = [rule for rule in settings.request_rules if rule.applies(ctx.version)]
    if rules:
        return transform_request(ctx, outgoing, rules, settings, ctx.gateway.state[NAME])
    return None


@hookimpl
def on_response(ctx, settings, response):
    status = response.status
    rules = [rule for rule in settings.response_rules if rule.applies(ctx.version, status)]
    if rules:
        return transform_response(ctx, response, rules, settings, ctx.gateway.state[NAME])
    return None
