"""Transformation rules compiled from the settings, ready to apply to one message.

Within a rule the order is fixed and documented: headers (remove, rename,
set, add), query (the same), path, status, then body fields (remove, rename,
set). ``add`` never replaces what is there; ``set`` does.

Header names only ever come from the configuration; values built from the
request are refused (400) when they hold a control character (CR, LF, NUL...),
so no request can inject a header; text beyond ASCII is sent as UTF-8. Values put
into a path are percent-encoded, may not be empty, ``.`` or ``..``, and the
result must be a valid canonical path; values put into the query are
percent-encoded; values put into a JSON body are JSON-encoded.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from gateway.errors import GatewayError
from gateway.paths import BadPath, canonical_path

from .jsonfields import FieldPath, FieldPathError, check_rename, parse_field_path, remove_field, rename_field, set_field
from .templates import RequestValues, Template, TemplateError, compile_template

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Framing and hop-by-hop headers belong to the gateway: a rule setting them would desynchronise the message.
RESERVED_HEADERS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "keep-alive", "proxy-connection", "te", "trailer",
    "upgrade", "expect",
})


class InvalidHeaderValue(GatewayError):
    status, code = 400, "invalid_header_value"
    message = "a header value built from the request has a control character (CR, LF, NUL...)"


class InvalidRewrittenPath(GatewayError):
    status, code, message = 400, "bad_path", "the rewritten path is not valid"


class RuleError(ValueError):
    """A problem in one key of a rule table: ``key`` and the reason."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(reason)
        self.key = key


@dataclass(frozen=True)
class FieldEdits:
    """Remove, rename, set and add, in that order, on a multi-valued mapping (headers, query)."""

    remove: tuple[str, ...] = ()
    rename: tuple[tuple[str, str], ...] = ()
    set: tuple[tuple[str, Template], ...] = ()
    add: tuple[tuple[str, Template], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.remove or self.rename or self.set or self.add)

    def apply(self, fields: Any, render: Callable[[Template], str | None]) -> None:
        for name in self.remove:
            fields.popall(name, None)
        for old, new in self.rename:
            moved = fields.popall(old, None)
            if moved:
                fields.popall(new, None)
                for value in moved:
                    fields.add(new, value)
        for name, template in self.set:
            value = render(template)
            if value is not None:
                fields[name] = value
        for name, template in self.add:
            if name not in fields:
                value = render(template)
                if value is not None:
                    fields[name] = value


@dataclass(frozen=True)
class PathRewrite:
    pattern: re.Pattern[str]
    replace: Template

    def apply(self, path: str, values: RequestValues) -> str:
        match = self.pattern.search(path)
        if match is None:
            return path
        values.match = match
        rewritten = self.replace.render(values, escape=_path_value)
        if rewritten is None:
            return path
        try:
            return canonical_path(rewritten)
        except BadPath as refusal:
            raise InvalidRewrittenPath(f"the rewritten path is not valid: {refusal.reason}") from None


@dataclass(frozen=True)
class BodyEdits:
    remove: tuple[FieldPath, ...] = ()
    rename: tuple[tuple[FieldPath, FieldPath], ...] = ()
    set: tuple[tuple[FieldPath, Any], ...] = ()  # a Template, or a JSON value copied for each use

    def __bool__(self) -> bool:
        return bool(self.remove or self.rename or self.set)

    def apply(self, document: Any, values: RequestValues) -> bool:
        changed = False
        for path in self.remove:
            changed |= remove_field(document, path)
        for old, new in self.rename:
            changed |= rename_field(document, old, new)
        for path, value in self.set:
            if isinstance(value, Template):
                changed |= set_field(document, path, lambda template=value: template.render(values))
            else:
                changed |= set_field(document, path, lambda literal=value: copy.deepcopy(literal))
        return changed


@dataclass(frozen=True)
class Rule:
    """One compiled [[request]] or [[response]] table; ``versions`` and ``statuses`` empty: any."""

    versions: frozenset[str]
    statuses: frozenset[int]
    headers: FieldEdits
    query: FieldEdits
    path: PathRewrite | None
    status: int | None
    body: BodyEdits

    def applies(self, version: str | None, status: int | None = None) -> bool:
        return (not self.versions or version in self.versions) and (not self.statuses or status in self.statuses)


def header_value(template: Template, values: RequestValues) -> str | None:
    """The rendered value as header text (Latin-1 on the wire): control characters refused,
    anything beyond ASCII sent as its UTF-8 bytes."""
    value = template.render(values)
    if value is None:
        return None
    if _CONTROL.search(value):
        raise InvalidHeaderValue()
    return value if value.isascii() else value.encode("utf-8").decode("latin-1")


def _path_value(value: str) -> str:
    if value in ("", ".", ".."):
        raise InvalidRewrittenPath("a value put into the path is empty, '.' or '..'")
    return quote(value, safe="!$&'()*+,=:@")


# --- compiling ---------------------------------------------------------------------------------


def compile_header_edits(
    add: Mapping[str, str], set_: Mapping[str, str], remove: Iterable[str], rename: Mapping[str, str], prefix: str,
) -> FieldEdits:
    for key, names in ((f"remove_{prefix}", remove), (f"rename_{prefix}", [*rename, *rename.values()]),
                       (f"set_{prefix}", set_), (f"add_{prefix}", add)):
        for name in names:
            if not _TOKEN.fullmatch(name):
                raise RuleError(key, f"{name!r} is not a header name")
            if name.lower() in RESERVED_HEADERS:
                raise RuleError(key, f"{name!r} is managed by the gateway and cannot be changed by a rule")
    return FieldEdits(
        tuple(remove), tuple(rename.items()),
        _header_templates(set_, f"set_{prefix}"), _header_templates(add, f"add_{prefix}"),
    )


def _header_templates(table: Mapping[str, str], key: str) -> tuple[tuple[str, Template], ...]:
    compiled = []
    for name, text in table.items():
        template = _template(text, key)
        literal = "".join(part for part in template.parts if isinstance(part, str))
        if _CONTROL.search(literal):
            raise RuleError(key, f"the value of {name!r} has a control character")
        compiled.append((name, template))
    return tuple(compiled)


def compile_query_edits(
    add: Mapping[str, str], set_: Mapping[str, str], remove: Iterable[str], rename: Mapping[str, str],
) -> FieldEdits:
    return FieldEdits(
        tuple(remove), tuple(rename.items()),
        tuple((name, _template(text, "set_query")) for name, text in set_.items()),
        tuple((name, _template(text, "add_query")) for name, text in add.items()),
    )


def compile_path_rewrite(pattern: str | None, replace: str | None) -> PathRewrite | None:
    if pattern is None and replace is None:
        return None
    if pattern is None or replace is None:
        raise RuleError("path_pattern", "path_pattern and path_replace go together")
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise RuleError("path_pattern", f"{pattern!r} is not a regular expression: {exc}") from None
    template = _template(replace, "path_replace", allow_match=True)
    for reference in template.references:
        name = reference.name
        if reference.kind == "match" and not (name.isdigit() and int(name) <= regex.groups or name in regex.groupindex):
            raise RuleError("path_replace", f"{{match.{name}}}: path_pattern has no such group")
    shape = "".join(part if isinstance(part, str) else "x" for part in template.parts)
    try:
        if canonical_path(shape) != shape:
            raise BadPath("it is not in canonical form")
    except BadPath as refusal:
        raise RuleError("path_replace", f"{replace!r} is not a valid path: {refusal.reason}") from None
    return PathRewrite(regex, template)


def compile_body_edits(set_: Mapping[str, Any], remove: Iterable[str], rename: Mapping[str, str]) -> BodyEdits:
    try:
        removed = tuple(parse_field_path(path) for path in remove)
    except FieldPathError as exc:
        raise RuleError("remove_body", str(exc)) from None
    try:
        renamed = tuple((parse_field_path(old), parse_field_path(new)) for old, new in rename.items())
        for old, new in renamed:
            check_rename(old, new)
    except FieldPathError as exc:
        raise RuleError("rename_body", str(exc)) from None
    try:
        assigned = tuple(
            (parse_field_path(path, wildcard_last=False),
             _template(value, "set_body") if isinstance(value, str) else value)
            for path, value in set_.items()
        )
    except FieldPathError as exc:
        raise RuleError("set_body", str(exc)) from None
    return BodyEdits(removed, renamed, assigned)


def _template(text: str, key: str, allow_match: bool = False) -> Template:
    try:
        return compile_template(text, allow_match=allow_match)
    except TemplateError as exc:
        raise RuleError(key, str(exc)) from None


def compile_rule(settings: Any, *, request: bool) -> tuple[Rule | None, list[tuple[str, str]]]:
    """The compiled rule of one settings table, or None and every problem as (key, reason)."""
    problems: list[tuple[str, str]] = []

    def attempt(compile_part: Any, *args: Any) -> Any:
        try:
            return compile_part(*args)
        except RuleError as exc:
            problems.append((exc.key, str(exc)))
            return None

    s = settings
    headers = attempt(compile_header_edits, s.add_headers, s.set_headers, s.remove_headers, s.rename_headers, "headers")
    body = attempt(compile_body_edits, s.set_body, s.remove_body, s.rename_body)
    query, path = FieldEdits(), None
    statuses: frozenset[int] = frozenset()
    status = None
    if request:
        query = attempt(compile_query_edits, s.add_query, s.set_query, s.remove_query, s.rename_query)
        path = attempt(compile_path_rewrite, s.path_pattern, s.path_replace)
    else:
        statuses, status = frozenset(s.statuses), s.set_status
        if any(not 100 <= code <= 599 for code in statuses):
            problems.append(("statuses", "status codes are between 100 and 599"))
        if status is not None and not 200 <= status <= 599:
            problems.append(("set_status", "must be between 200 and 599"))
    if problems:
        return None, problems
    return Rule(frozenset(s.versions), statuses, headers, query, path, status, body), problems
