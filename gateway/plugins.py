"""Finding, loading and configuring plugins, and building each route's chain.

Plugins are found in the ``plugway`` entry-point group (installed
distributions such as ``plugway-ratelimit``) or imported by dotted path when
the configuration names one (``[plugins."mycompany.gateway_ext"]``). Only the
plugins named in the configuration are imported.

A plugin's table may hold two keys of the core's besides its own settings:
``enabled`` (false turns a globally enabled plugin off for one route) and
``priority`` (overrides the plugin's declared priority; global only).

Chains are compiled here once per configuration, per route: tuples of plain
callables with the route's settings bound, so serving a request never asks
pluggy anything and a route pays only for its own plugins.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pluggy

from . import hookspecs
from .config.model import GatewaySettings
from .config.schema import ConfigError, ConfigErrors, join_path, parse_settings, render_settings

ENTRY_POINT_GROUP = "plugway"
CORE_KEYS = ("enabled", "priority")


@dataclass(frozen=True)
class PluginDeclaration:
    """What ``declare_plugin`` returns: the settings class and the default priority."""

    settings: type | None = None
    priority: int = 0


@dataclass
class LoadedPlugin:
    name: str
    module: Any
    version: str | None
    declaration: PluginDeclaration
    priority: int = 0
    global_settings: Any = None
    enabled_globally: bool = False
    route_settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Chain:
    """One route's plugins, compiled: per phase, the callables in call order.

    ``on_request`` and ``on_response`` steps carry the plugin's depth (its
    position in priority order) so that a short-circuit unwinds only through
    the plugins that had already seen the request.
    """

    plugins: tuple[str, ...] = ()
    on_request: tuple[tuple[int, Callable], ...] = ()
    before_upstream: tuple[Callable, ...] = ()
    on_error: tuple[Callable, ...] = ()
    on_response: tuple[tuple[int, Callable], ...] = ()
    after_response: tuple[Callable, ...] = ()
    websocket_open: tuple[Callable, ...] = ()
    websocket_message: tuple[Callable, ...] = ()
    websocket_close: tuple[Callable, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.plugins)


EMPTY_CHAIN = Chain()
_PHASE_ARGUMENTS = {
    "on_request": ("ctx",),
    "before_upstream": ("ctx", "outgoing"),
    "on_error": ("ctx", "error"),
    "on_response": ("ctx", "response"),
    "after_response": ("ctx",),
    "websocket_open": ("ctx",),
    "websocket_message": ("ctx", "message", "direction"),
    "websocket_close": ("ctx", "code"),
}


class PluginSet:
    """The plugins of one configuration, loaded and with their settings parsed."""

    def __init__(self, manager: pluggy.PluginManager, plugins: list[LoadedPlugin]) -> None:
        self.manager = manager
        self.plugins = sorted(plugins, key=lambda plugin: (-plugin.priority, plugin.name))

    def chain(self, route_name: str) -> Chain:
        active = [(plugin, plugin.route_settings[route_name]) for plugin in self.plugins
                  if route_name in plugin.route_settings]
        if not active:
            return EMPTY_CHAIN
        steps = {phase: [] for phase in _PHASE_ARGUMENTS}
        for depth, (plugin, settings) in enumerate(active):
            for phase in _PHASE_ARGUMENTS:
                impl = self._impl(phase, plugin.name)
                if impl is not None:
                    steps[phase].append((depth, _bind(impl, settings, _PHASE_ARGUMENTS[phase])))
        return Chain(
            plugins=tuple(plugin.name for plugin, _ in active),
            on_request=tuple(steps["on_request"]),
            before_upstream=tuple(step for _, step in steps["before_upstream"]),
            on_error=tuple(step for _, step in steps["on_error"]),
            on_response=tuple(reversed(steps["on_response"])),
            after_response=tuple(step for _, step in steps["after_response"]),
            websocket_open=tuple(step for _, step in steps["websocket_open"]),
            websocket_message=tuple(step for _, step in steps["websocket_message"]),
            websocket_close=tuple(step for _, step in steps["websocket_close"]),
        )

    def lifecycle(self, hook: str) -> list[Callable]:
        """The ``worker_started`` / ``worker_stopping`` / ``admin_routes`` callables, in calling order."""
        calls = [impl.function for plugin in self.plugins if (impl := self._impl(hook, plugin.name))]
        return calls[::-1] if hook == "worker_stopping" else calls

    def rendered(self, settings: GatewaySettings) -> dict[str, Any]:
        """Effective plugin settings, global and per route, for ``plugway config show``."""
        global_tables = {}
        for plugin in self.plugins:
            if plugin.enabled_globally or plugin.name in settings.plugins:
                global_tables[plugin.name] = _render_plugin(plugin, plugin.global_settings, plugin.enabled_globally)
        routes = []
        for route in settings.routes:
            tables = {}
            for name in route.plugins:
                plugin = self.get(name)
                tables[name] = _render_plugin(plugin, plugin.route_settings.get(route.name), None)
            routes.append(tables)
        return {"global": global_tables, "routes": routes}

    def get(self, name: str) -> LoadedPlugin:
        return next(plugin for plugin in self.plugins if plugin.name == name)

    def _impl(self, hook: str, plugin_name: str) -> pluggy.HookImpl | None:
        for impl in getattr(self.manager.hook, hook).get_hookimpls():
            if impl.plugin_name == plugin_name:
                return impl
        return None


def _render_plugin(plugin: LoadedPlugin, settings: Any, enabled: bool | None) -> dict[str, Any]:
    table: dict[str, Any] = {}
    if enabled is not None:
        table["enabled"] = enabled
        table["priority"] = plugin.priority
    if settings is None:
        if enabled is None:
            table["enabled"] = False
        return table
    if plugin.declaration.settings is not None:
        table.update(render_settings(settings))
    return table


def _bind(impl: pluggy.HookImpl, settings: Any, dynamic: tuple[str, ...]) -> Callable:
    """A callable taking the phase's per-request arguments positionally."""
    wanted = set(impl.argnames)
    function = functools.partial(impl.function, settings=settings) if "settings" in wanted else impl.function
    names = tuple(name for name in dynamic if name in wanted)
    if names == dynamic == ("ctx",):
        return lambda ctx: function(ctx=ctx)
    if names == dynamic:
        return lambda *args: function(**dict(zip(names, args)))
    positions = tuple(dynamic.index(name) for name in names)
    return lambda *args: function(**{name: args[i] for name, i in zip(names, positions)})


# --- discovery and loading ----------------------------------------------------------------------


def installed_plugins() -> dict[str, importlib.metadata.EntryPoint]:
    return {entry.name: entry for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def new_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    return manager


def configured_names(settings: GatewaySettings) -> list[str]:
    names = list(settings.plugins)
    for route in settings.routes:
        names.extend(name for name in route.plugins if name not in names)
    return names


def load_plugins(settings: GatewaySettings, extra: Mapping[str, Any] | None = None) -> PluginSet:
    """Import the configured plugins and parse their settings; ``ConfigErrors`` lists every problem.

    ``extra`` maps names to plugin objects registered without discovery
    (tests and embedding use it).
    """
    manager = new_manager()
    loaded, errors = _load(settings, extra, manager, check_core=True)
    if errors:
        raise ConfigErrors(errors)
    return PluginSet(manager, loaded)


def plugin_table_errors(table: Mapping[str, Any]) -> list[ConfigError]:
    """The errors of the plugin tables of a raw configuration ``table`` whose core settings are
    invalid, so that ``plugway check`` reports both at once. Checks against the core settings
    (``validate_with``) need valid core settings and are left out."""
    plugins = table.get("plugins", {})
    routes = table.get("routes", [])
    if not isinstance(plugins, dict) or not isinstance(routes, list):
        return []
    view = SimpleNamespace(plugins={name: t for name, t in plugins.items() if isinstance(t, dict)}, routes=[
        SimpleNamespace(name=route.get("name", f"#{index}"),
                        plugins={name: t for name, t in route.get("plugins", {}).items() if isinstance(t, dict)})
        for index, route in enumerate(routes) if isinstance(route, dict) and isinstance(route.get("plugins", {}), dict)
    ])
    return _load(view, None, new_manager(), check_core=False)[1]


def _load(
    settings: Any, extra: Mapping[str, Any] | None, manager: pluggy.PluginManager, check_core: bool,
) -> tuple[list[LoadedPlugin], list[ConfigError]]:
    errors: list[ConfigError] = []
    installed = installed_plugins()
    loaded: list[LoadedPlugin] = []
    for name in configured_names(settings):
        path = join_path("plugins", name)
        plugin = _import(name, installed, (extra or {}).get(name), manager, path, errors)
        if plugin is not None:
            before = len(errors)
            _configure_tables(plugin, settings, errors)
            if check_core and len(errors) == before:
                _check_against_core(plugin, settings, errors)
            loaded.append(plugin)
    return loaded, errors


def _import(
    name: str, installed: dict[str, importlib.metadata.EntryPoint], given: Any,
    manager: pluggy.PluginManager, path: str, errors: list[ConfigError],
) -> LoadedPlugin | None:
    version = None
    try:
        if given is not None:
            module = given
        elif name in installed:
            entry = installed[name]
            module = entry.load()
            version = entry.dist.version if entry.dist else None
        elif "." in name:
            module = importlib.import_module(name)
        else:
            known = ", ".join(sorted(installed)) or "none"
            errors.append(ConfigError(path, f'no plugin named "{name}" is installed (installed: {known})'))
            return None
        manager.register(module, name=name)
        manager.check_pending()
        impls = [impl for impl in manager.hook.declare_plugin.get_hookimpls() if impl.plugin_name == name]
        if not impls:
            raise TypeError("it does not implement the declare_plugin hook")
        declaration = impls[0].function()
        if not isinstance(declaration, PluginDeclaration):
            raise TypeError("declare_plugin must return a gateway.PluginDeclaration")
    except (ImportError, TypeError, pluggy.PluginValidationError) as exc:
        errors.append(ConfigError(path, f"cannot load the plugin: {exc}"))
        return None
    return LoadedPlugin(name, module, version, declaration, priority=declaration.priority)


def _check_against_core(plugin: LoadedPlugin, settings: GatewaySettings, errors: list[ConfigError]) -> None:
    """A settings class may check references into the core configuration (upstream names...)
    with ``validate_with(gateway_settings)``, yielding (key, reason) like ``validate``."""
    tables = [(join_path("plugins", plugin.name), plugin.global_settings)] if plugin.enabled_globally else []
    for index, route in enumerate(settings.routes):
        if plugin.name in route.plugins and route.name in plugin.route_settings:
            tables.append((join_path(f"routes[{index}].plugins", plugin.name), plugin.route_settings[route.name]))
    for path, parsed in tables:
        check = getattr(parsed, "validate_with", None)
        if check is not None:
            errors.extend(ConfigError(f"{path}.{key}" if key else path, reason) for key, reason in check(settings))


def _configure_tables(plugin: LoadedPlugin, settings: GatewaySettings, errors: list[ConfigError]) -> None:
    path = join_path("plugins", plugin.name)
    global_table = settings.plugins.get(plugin.name)
    if global_table is not None:
        priority = global_table.get("priority", plugin.priority)
        if isinstance(priority, bool) or not isinstance(priority, int):
            errors.append(ConfigError(join_path(path, "priority"), "must be an integer"))
        else:
            plugin.priority = priority
        parsed = _parse(plugin, _own_keys(global_table), path, {}, errors)
        plugin.enabled_globally = _enabled(global_table, path, errors) and parsed is not _FAILED
        plugin.global_settings = None if parsed is _FAILED else parsed
    for index, route in enumerate(settings.routes):
        route_table = route.plugins.get(plugin.name)
        route_path = join_path(f"routes[{index}].plugins", plugin.name)
        if route_table is None:
            if plugin.enabled_globally:
                plugin.route_settings[route.name] = plugin.global_settings
            continue
        if "priority" in route_table:
            errors.append(ConfigError(join_path(route_path, "priority"), "can only be set in [plugins.NAME]"))
        if not _enabled(route_table, route_path, errors):
            continue
        merged = dict(_own_keys(global_table or {}))
        merged.update(_own_keys(route_table))
        key_paths = {key: join_path(route_path, key) for key in route_table}
        parsed = _parse(plugin, merged, route_path, key_paths, errors)
        if parsed is not _FAILED:
            plugin.route_settings[route.name] = parsed


def _enabled(table: Mapping[str, Any], path: str, errors: list[ConfigError]) -> bool:
    enabled = table.get("enabled", True)
    if not isinstance(enabled, bool):
        errors.append(ConfigError(join_path(path, "enabled"), "must be true or false"))
        return False
    return enabled


def _own_keys(table: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in table.items() if key not in CORE_KEYS}


_FAILED = object()


def _parse(
    plugin: LoadedPlugin, table: dict[str, Any], path: str, key_paths: dict[str, str], errors: list[ConfigError],
) -> Any:
    """The settings object (None for a plugin without settings), or _FAILED."""
    cls = plugin.declaration.settings
    before = len(errors)
    if cls is None:
        for key in table:
            errors.append(ConfigError(key_paths.get(key) or join_path(path, key), "this plugin takes no settings"))
        return _FAILED if len(errors) > before else None
    parsed = parse_settings(cls, _thaw(table), path, errors, key_paths)
    return _FAILED if len(errors) > before else parsed


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _thaw(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [_thaw(item) for item in value]
    return value


def add_plugin_commands(commands: Any) -> None:
    """Let every installed plugin add its subcommands to ``plugway`` (see the cli_commands hook)."""
    manager = new_manager()
    for name, entry in installed_plugins().items():
        try:
            manager.register(entry.load(), name=name)
        except (ImportError, pluggy.PluginValidationError, ValueError):
            continue  # a broken plugin must not break the plugway command; `plugway check` reports it
    manager.hook.cli_commands(commands=commands)


def describe_installed() -> Iterable[tuple[str, str, str]]:
    """(name, version, module) of every plugin installed in this environment."""
    for name, entry in sorted(installed_plugins().items()):
        yield name, entry.dist.version if entry.dist else "?", entry.value
