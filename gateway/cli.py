"""The ``plugway`` command.

    plugway run      [-c FILE]     serve: a supervisor and its workers
    plugway reload   [-c FILE]     rolling reload of the running gateway; waits for the result
    plugway stop     [-c FILE]     graceful stop (--now: immediate)
    plugway status   [-c FILE]     the running gateway's supervisor and workers
    plugway check    [-c FILE]     validate configuration and plugin settings (like nginx -t)
    plugway config show [-c FILE]  print the effective configuration, defaults filled in
    plugway init     [-o FILE]     write a commented starter configuration
    plugway plugins  [-c FILE]     list installed plugins and where they are enabled
    plugway <other>                subcommands added by installed plugins (cli_commands hook)

The configuration file is ``-c FILE``, else ``$PLUGWAY_CONFIG``, else
``/etc/plugway/plugway.toml``. Exit status 2 means the configuration is invalid.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from . import config
from .config.schema import ConfigErrors
from .config.starter import starter_config
from .plugins import add_plugin_commands, describe_installed, load_plugins, plugin_table_errors

DEFAULT_CONFIG = "/etc/plugway/plugway.toml"
EXIT_CONFIG_INVALID = 2


def main(argv: list[str] | None = None) -> int:
    parser, commands = _parser()
    arguments = sys.argv[1:] if argv is None else argv
    if arguments and not arguments[0].startswith("-") and arguments[0] not in commands.choices:
        add_plugin_commands(commands)  # only then: the supervisor (plugway run) must import no plugin
    args = parser.parse_args(arguments)
    if not hasattr(args, "command"):
        parser.print_help()
        return 1
    try:
        return args.command(args) or 0
    except ConfigErrors as exc:
        print(f"plugway: the configuration in {args.config} is invalid:", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        return EXIT_CONFIG_INVALID


def _parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(prog="plugway", description="Plugway API gateway")
    commands = parser.add_subparsers(metavar="COMMAND")
    default_config = os.environ.get("PLUGWAY_CONFIG", DEFAULT_CONFIG)

    def command(name: str, function, help: str, with_config: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(command=function)
        if with_config:
            sub.add_argument("-c", "--config", default=default_config, help="configuration file")
        return sub

    command("run", run, "serve the gateway: a supervisor and its workers")
    reload = command("reload", reload_gateway, "reload the running gateway (rolling, zero downtime) and wait")
    reload.add_argument("--no-wait", action="store_true", help="return once the signal is sent")
    reload.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the result")
    stop = command("stop", stop_gateway, "stop the running gateway gracefully")
    stop.add_argument("--now", action="store_true", help="stop at once (SIGQUIT) instead of draining")
    command("status", show_status, "show the running gateway's supervisor and workers")
    command("check", check, "validate the configuration and plugin settings without starting anything")
    show = commands.add_parser("config", help="inspect the configuration").add_subparsers(metavar="ACTION")
    show_cmd = show.add_parser("show", help="print the effective configuration with defaults filled in")
    show_cmd.set_defaults(command=config_show)
    show_cmd.add_argument("-c", "--config", default=default_config)
    init = command("init", init_config, "write a commented starter configuration", with_config=False)
    init.add_argument("-o", "--output", help="file to write (default: standard output)")
    command("plugins", list_plugins, "list installed plugins, their version, priority and where they are enabled")
    return parser, commands


def _load(args: argparse.Namespace):
    table = config.read_table(args.config)
    try:
        settings = config.from_table(table)
    except ConfigErrors as exc:  # report the plugins' errors too, all at once
        raise ConfigErrors([*exc.errors, *plugin_table_errors(table)]) from None
    return settings, load_plugins(settings)


def check(args: argparse.Namespace) -> int:
    settings, plugins = _load(args)
    names = ", ".join(plugin.name for plugin in plugins.plugins) or "none"
    print(
        f"plugway: the configuration in {args.config} is valid: {len(settings.routes)} routes, "
        f"{len(settings.upstreams)} upstreams, plugins: {names}"
    )
    return 0


def config_show(args: argparse.Namespace) -> int:
    settings, plugins = _load(args)
    sys.stdout.write(config.dumps(settings, plugins.rendered(settings)))
    return 0


def init_config(args: argparse.Namespace) -> int:
    text = starter_config()
    if args.output:
        path = Path(args.output)
        if path.exists():
            print(f"plugway: {path} exists; not overwriting it", file=sys.stderr)
            return 1
        path.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def list_plugins(args: argparse.Namespace) -> int:
    settings = config.load(args.config) if Path(args.config).exists() else None
    loaded = {plugin.name: plugin for plugin in load_plugins(settings).plugins} if settings else {}
    rows = [("NAME", "VERSION", "PRIORITY", "ENABLED")]
    seen = set()
    for name, version, _ in describe_installed():
        rows.append((name, version, *_where(loaded.get(name), settings)))
        seen.add(name)
    for name, plugin in loaded.items():
        if name not in seen:
            rows.append((name, plugin.version or "-", *_where(plugin, settings)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _where(plugin, settings) -> tuple[str, str]:
    if plugin is None:
        return "-", "not configured"
    routes = sorted(plugin.route_settings)
    if plugin.enabled_globally and len(routes) == len(settings.routes):
        return str(plugin.priority), "all routes"
    return str(plugin.priority), ("routes: " + ", ".join(routes)) if routes else "no route"


def run(args: argparse.Namespace) -> int:
    """The supervisor. It imports no plugin: workers load them after fork (see gateway.supervisor)."""
    from . import runtime
    from .logs import setup_logging

    from .server import ParserUnavailable, require_c_parser

    settings = config.load(args.config)
    setup_logging(settings.log.level)
    try:
        require_c_parser()
    except ParserUnavailable as exc:
        print(f"plugway: {exc}", file=sys.stderr)
        return 1
    directory = runtime.runtime_dir(settings)
    try:
        runtime.claim(directory)
    except runtime.AlreadyRunning as exc:
        print(f"plugway: {exc}", file=sys.stderr)
        return 1
    runtime.prepare_metrics(directory)  # before prometheus-client is imported below
    from .supervisor import Supervisor

    return Supervisor(str(Path(args.config).resolve()), settings, directory).run()


def _running(args: argparse.Namespace):
    from . import runtime

    directory = runtime.runtime_dir_of(args.config)
    pid = runtime.running_pid(directory)
    if pid is None:
        raise SystemExit(f"plugway: no running gateway found in {directory}")
    return runtime, directory, pid


def reload_gateway(args: argparse.Namespace) -> int:
    runtime, directory, pid = _running(args)
    before = runtime.read_status(directory) or {}
    number = sum((before.get("reloads") or {}).values())
    os.kill(pid, signal.SIGHUP)
    if args.no_wait:
        return 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        status = runtime.read_status(directory) or {}
        last = status.get("last_reload") or {}
        if last.get("number", 0) > number:
            if last["result"] == "success":
                print(f"plugway: reloaded, now serving generation {last['generation']}")
                return 0
            print("plugway: the reload failed; still serving the previous configuration:", file=sys.stderr)
            for error in last["errors"]:
                print(f"  {error}", file=sys.stderr)
            return 1
        if runtime.running_pid(directory) != pid:
            print("plugway: the gateway stopped during the reload", file=sys.stderr)
            return 1
        time.sleep(0.05)
    print("plugway: no reload result within the timeout", file=sys.stderr)
    return 1


def stop_gateway(args: argparse.Namespace) -> int:
    runtime, directory, pid = _running(args)
    os.kill(pid, signal.SIGQUIT if args.now else signal.SIGTERM)
    while runtime.running_pid(directory) == pid:
        time.sleep(0.05)
    return 0


def show_status(args: argparse.Namespace) -> int:
    import json

    runtime, directory, _ = _running(args)
    print(json.dumps(runtime.read_status(directory), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
