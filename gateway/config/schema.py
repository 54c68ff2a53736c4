"""Frozen dataclasses as the schema of a TOML table, for the core and for plugins.

A settings class is a ``@dataclass(frozen=True)`` whose fields are declared
with :func:`setting`; the field's type annotation says how the TOML value is
read. Supported types: ``str``, ``int``, ``float``, ``bool``, ``Duration``,
``Size``, ``Rate``, ``Secret``, ``Literal[...]``, ``tuple[T, ...]`` (TOML arrays),
``Mapping[str, T]`` (TOML tables with free keys), nested settings classes,
``T | None`` and unions of a scalar with a settings class.

:func:`parse_settings` reads a table strictly: unknown keys, missing required
keys and wrong types are all reported, each with its TOML path. A class may
define ``validate(self)`` yielding ``(key, message)`` pairs for checks across
fields. :func:`render_settings` turns an instance back into plain TOML data,
defaults included, so that parsing the rendering gives an equal instance.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from .units import Duration, Rate, Secret, Size

_NO_DEFAULT = dataclasses.MISSING


class ConfigError(Exception):
    """One problem in the configuration: where it is (a TOML path) and why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


class ConfigErrors(Exception):
    """Every problem found in one configuration, reported together."""

    def __init__(self, errors: Iterable[ConfigError]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(str(error) for error in self.errors))


def setting(
    default: Any = _NO_DEFAULT,
    *,
    doc: str,
    factory: Callable[[], Any] | None = None,
    parse: Callable[[Any], Any] | None = None,
    render: Callable[[Any], Any] | None = None,
) -> Any:
    """Declare one key of a settings table.

    ``doc`` is the one-line description shown by ``plugway init``; ``parse``
    turns the raw TOML value into the field's value (raising ValueError with
    a reason) when the type annotation alone cannot; ``render`` is its inverse.
    """
    metadata = {"doc": doc, "parse": parse, "render": render}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def join_path(base: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{base}[{key}]"
    if not key.replace("_", "").replace("-", "").isalnum():
        key = f'"{key}"'
    return f"{base}.{key}" if base else key


def parse_settings(
    cls: type,
    table: Any,
    path: str,
    errors: list[ConfigError],
    key_paths: Mapping[str, str] | None = None,
) -> Any:
    """Read ``table`` into an instance of ``cls``; append problems to ``errors``.

    Returns None when anything was wrong. ``key_paths`` overrides the TOML
    path reported for given top-level keys (used when a route's plugin table
    is merged over the global one).
    """
    if not isinstance(table, Mapping):
        errors.append(ConfigError(path, f"must be a table, not {_toml_type(table)}"))
        return None
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls)}
    failed = False
    values: dict[str, Any] = {}
    for key in table:
        if key not in fields:
            known = ", ".join(sorted(fields)) or "none"
            key_path = (key_paths or {}).get(key) or join_path(path, key)
            errors.append(ConfigError(key_path, f"unknown key (known keys: {known})"))
            failed = True
    for name, field in fields.items():
        key_path = (key_paths or {}).get(name) or join_path(path, name)
        if name not in table:
            if field.default is _NO_DEFAULT and field.default_factory is _NO_DEFAULT:
                errors.append(ConfigError(key_path, "is required"))
                failed = True
            continue
        before = len(errors)
        value = _parse_value(hints[name], table[name], key_path, errors, field.metadata.get("parse"))
        if len(errors) > before:
            failed = True
        else:
            values[name] = value
    if failed:
        return None
    try:
        instance = cls(**values)
    except ValueError as exc:
        errors.append(ConfigError(path, str(exc)))
        return None
    validate = getattr(instance, "validate", None)
    if validate is not None:
        problems = list(validate())
        for key, reason in problems:
            key_path = (key_paths or {}).get(key) or (f"{path}.{key}" if path and key else key or path)
            errors.append(ConfigError(key_path, reason))
        if problems:
            return None
    return instance


def _parse_value(kind: Any, raw: Any, path: str, errors: list[ConfigError], parse: Any = None) -> Any:
    if parse is not None:
        try:
            return parse(raw)
        except (ValueError, TypeError) as exc:
            errors.append(ConfigError(path, str(exc)))
            return None
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return _parse_union(typing.get_args(kind), raw, path, errors)
    if origin is Literal:
        choices = typing.get_args(kind)
        if raw not in choices:
            errors.append(ConfigError(path, f"must be one of {', '.join(map(repr, choices))}, not {raw!r}"))
        return raw
    if origin is tuple:
        item_kind = typing.get_args(kind)[0]
        if not isinstance(raw, list):
            errors.append(ConfigError(path, f"must be an array, not {_toml_type(raw)}"))
            return None
        return tuple(_parse_value(item_kind, item, join_path(path, i), errors) for i, item in enumerate(raw))
    if origin in (Mapping, dict, typing.Mapping):
        value_kind = typing.get_args(kind)[1]
        if not isinstance(raw, Mapping):
            errors.append(ConfigError(path, f"must be a table, not {_toml_type(raw)}"))
            return None
        return types.MappingProxyType(
            {key: _parse_value(value_kind, value, join_path(path, key), errors) for key, value in raw.items()}
        )
    if dataclasses.is_dataclass(kind):
        return parse_settings(kind, raw, path, errors)
    return _parse_scalar(kind, raw, path, errors)


def _parse_union(kinds: tuple[Any, ...], raw: Any, path: str, errors: list[ConfigError]) -> Any:
    candidates = [kind for kind in kinds if kind is not type(None)]
    if isinstance(raw, Mapping):
        tables = [kind for kind in candidates if dataclasses.is_dataclass(kind)]
        if tables:
            return parse_settings(tables[0], raw, path, errors)
    scalars = [kind for kind in candidates if not dataclasses.is_dataclass(kind)]
    attempts: list[ConfigError] = []
    for kind in scalars:
        attempt: list[ConfigError] = []
        value = _parse_value(kind, raw, path, attempt)
        if not attempt:
            return value
        attempts.extend(attempt)
    errors.append(attempts[0] if len(attempts) == 1 else ConfigError(path, f"has the wrong type: {_toml_type(raw)}"))
    return None


def _parse_scalar(kind: Any, raw: Any, path: str, errors: list[ConfigError]) -> Any:
    if kind in (Duration, Size, Rate, Secret):
        try:
            return kind(raw)
        except (ValueError, TypeError) as exc:
            errors.append(ConfigError(path, str(exc)))
            return None
    accepted = {float: (int, float), int: (int,), bool: (bool,), str: (str,)}.get(kind)
    if accepted is None:
        raise TypeError(f"settings type {kind!r} is not supported")
    if isinstance(raw, bool) and kind is not bool or not isinstance(raw, accepted):
        errors.append(ConfigError(path, f"must be {_kind_name(kind)}, not {_toml_type(raw)}"))
        return None
    return kind(raw)


def _kind_name(kind: Any) -> str:
    return {float: "a number", int: "an integer", bool: "true or false", str: "a string"}[kind]


def _toml_type(raw: Any) -> str:
    if isinstance(raw, bool):
        return "a boolean"
    if isinstance(raw, (int, float)):
        return f"the number {raw!r}"
    if isinstance(raw, str):
        return f"the string {raw!r}"
    if isinstance(raw, list):
        return "an array"
    if isinstance(raw, Mapping):
        return "a table"
    return type(raw).__name__


def render_settings(instance: Any) -> dict[str, Any]:
    """Turn a settings instance into TOML-ready data, defaults included."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        render = field.metadata.get("render")
        rendered = render(value) if render is not None else render_value(value)
        if rendered is not None:
            out[field.name] = rendered
    return out


def render_value(value: Any) -> Any:
    if value is None:
        return None
    if dataclasses.is_dataclass(value):
        return render_settings(value)
    if isinstance(value, Secret):
        return value.render()
    if isinstance(value, (Duration, Size, Rate)):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [render_value(item) for item in value]
    if isinstance(value, Mapping):
        return {key: render_value(item) for key, item in value.items()}
    return value


def documented_settings(cls: type) -> Iterable[tuple[str, str]]:
    """(key, doc) for every key of a settings class, for `plugway init` and doc tests."""
    for field in dataclasses.fields(cls):
        yield field.name, field.metadata.get("doc", "")
