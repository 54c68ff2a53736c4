"""Configuration: TOML in, validated and frozen settings out.

``load(path)`` is the only way in. It never returns a half-valid object: it
either returns a ``GatewaySettings`` or raises ``ConfigErrors`` listing every
problem with its TOML path. Plugin tables are checked by ``gateway.plugins``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from .model import GatewaySettings
from .schema import ConfigError, ConfigErrors, parse_settings, render_settings

__all__ = ["ConfigError", "ConfigErrors", "GatewaySettings", "load", "loads", "dumps"]


def load(path: str | Path) -> GatewaySettings:
    return from_table(read_table(path))


def read_table(path: str | Path) -> dict[str, Any]:
    """The file's TOML as a table, or ConfigErrors when it cannot be read or parsed."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigErrors([ConfigError("", f"cannot read {path}: {exc.strerror}")]) from None
    except UnicodeDecodeError:
        raise ConfigErrors([ConfigError("", f"{path} is not UTF-8 text")]) from None
    return _parse_toml(text, str(path))


def loads(text: str, source: str = "<string>") -> GatewaySettings:
    return from_table(_parse_toml(text, source))


def _parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigErrors([ConfigError("", f"{source} is not valid TOML: {exc}")]) from None


def from_table(table: dict[str, Any]) -> GatewaySettings:
    errors: list[ConfigError] = []
    settings = parse_settings(GatewaySettings, table, "", errors)
    if errors:
        raise ConfigErrors(errors)
    return settings


def dumps(settings: GatewaySettings, plugin_settings: dict[str, Any] | None = None) -> str:
    """TOML for ``settings`` with every default filled in.

    ``plugin_settings`` replaces the raw plugin tables with their effective
    values (as rendered by ``gateway.plugins``) when given.
    """
    table = render_settings(settings)
    if plugin_settings is not None:
        table["plugins"] = plugin_settings["global"]
        for route, plugins in zip(table["routes"], plugin_settings["routes"]):
            route["plugins"] = plugins
    return tomli_w.dumps(table)
