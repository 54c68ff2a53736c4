"""The commented starter configuration written by ``plugway init``.

It is generated from the settings classes, so every key appears with its
default and its one-line description, and it can never drift from the code.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import tomli_w

from .model import AdminSettings, LogSettings, RouteSettings, ServerSettings, StoreSettings, UpstreamSettings
from .schema import render_value

_EXAMPLE_UPSTREAM = {"name": "backend", "targets": [{"url": "http://127.0.0.1:9001", "weight": 1}]}
_EXAMPLE_ROUTE = {"name": "api", "prefix": "/api", "upstream": "backend", "strip_prefix": True}


def starter_config() -> str:
    parts = [
        "# Plugway configuration. Every key is shown with its default; remove what you do not change.\n"
        "# Check it with `plugway check -c FILE` before applying it with `plugway reload`.\n",
        _table("server", ServerSettings),
        _table("admin", AdminSettings),
        _table("log", LogSettings),
        _table("store", StoreSettings),
        _table("upstreams", UpstreamSettings, _EXAMPLE_UPSTREAM, array=True),
        _table("routes", RouteSettings, _EXAMPLE_ROUTE, array=True),
        "# Plugins enabled on every route go in [plugins.NAME] tables; a route overrides them in\n"
        "# [routes.plugins.NAME]. `plugway plugins` lists the installed ones.\n",
    ]
    return "\n".join(parts)


def _table(name: str, cls: type, example: dict[str, Any] | None = None, array: bool = False) -> str:
    lines = [f"[[{name}]]" if array else f"[{name}]"]
    defaults = cls() if example is None else None
    for field in dataclasses.fields(cls):
        if field.name == "plugins":
            continue
        lines.append(f"# {field.metadata['doc']}")
        if example is not None and field.name in example:
            value = example[field.name]
        elif defaults is not None:
            value = render_value(getattr(defaults, field.name))
        elif field.default is not dataclasses.MISSING:
            value = render_value(field.default)
        else:
            value = render_value(field.default_factory())
        if value is None:
            lines.append(f"# {field.name} = (unset)")
        else:
            lines.append(f"{field.name} = {_inline(value)}")
    return "\n".join(lines) + "\n"


def _inline(value: Any) -> str:
    """A TOML value on one line: nested tables inline, so the key stays in its own table."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{key} = {_inline(item)}" for key, item in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_inline(item) for item in value) + "]"
    return tomli_w.dumps({"v": value}).strip()[len("v = "):]

