"""Purging from outside: ``POST /cache/purge`` on the admin API, and ``plugway cache purge``,
which calls that endpoint of the running gateway named by the configuration file."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

from gateway.store import StoreUnavailable

from .purge import PurgeRule, publish

PURGE_PATH = "/cache/purge"


def purge_endpoint(gateway: Any, state_key: str):
    """The admin handler: purge the shared store and this worker's memory store at once, and
    publish the purge for the other workers' memory stores."""
    from aiohttp import web

    async def purge(request: web.Request) -> web.Response:
        try:
            rule = PurgeRule.from_json(await request.json())
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            return _error(web, 400, "bad_purge", str(exc))
        state = gateway.state[state_key]
        memory = await rule.apply(state.memory) if state.memory is not None else 0
        state.memory_changed()
        try:
            shared = await rule.apply(state.shared)
            await publish(state.shared.store, rule, state.worker_id)
        except StoreUnavailable as exc:
            return _error(web, 503, "store_unavailable", f"the shared store failed: {exc}")
        state.metrics.purges.labels(rule.kind).inc()
        return web.json_response({"purged": {rule.kind: rule.value}, "deleted": {"shared": shared, "memory": memory}})

    return purge


def _error(web: Any, status: int, code: str, message: str):
    return web.json_response({"error": {"status": status, "code": code, "message": message}}, status=status)


# --- the plugway command ---------------------------------------------------------------------------


def add_commands(commands: Any) -> None:
    cache = commands.add_parser("cache", help="manage the response cache of a running gateway")
    actions = cache.add_subparsers(metavar="ACTION")
    purge = actions.add_parser("purge", help="purge cached responses by key, path prefix or tag",
                               description="Purge cached responses through the running gateway's admin API.")
    which = purge.add_mutually_exclusive_group(required=True)
    which.add_argument("--key", help='an exact key, e.g. "/api/items/1 https://api.example.com GET"')
    which.add_argument("--prefix", help='a path prefix, e.g. "/api/items/"')
    which.add_argument("--tag", help="a tag from the upstream's tag header (Surrogate-Key)")
    purge.add_argument("-c", "--config", default=os.environ.get("PLUGWAY_CONFIG", "/etc/plugway/plugway.toml"),
                       help="configuration file (its admin.listen and admin.token_env are used)")
    purge.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the gateway")
    purge.set_defaults(command=purge_command)
    cache.set_defaults(command=lambda args: cache.print_help() or 1)


def purge_command(args: argparse.Namespace) -> int:
    from gateway import config
    from gateway.config.model import parse_address

    settings = config.load(args.config)
    admin = settings.admin
    if admin.listen is None:
        print(f"plugway: the admin API is disabled in {args.config} (admin.listen)", file=sys.stderr)
        return 1
    host, port = parse_address(admin.listen)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}{PURGE_PATH}"
    rule = {kind: getattr(args, kind) for kind in ("key", "prefix", "tag") if getattr(args, kind) is not None}
    request = urllib.request.Request(url, data=json.dumps(rule).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    if admin.token_env:
        token = os.environ.get(admin.token_env)
        if not token:
            print(f"plugway: ${admin.token_env} (admin.token_env) is not set", file=sys.stderr)
            return 1
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            print(response.read().decode())
            return 0
    except urllib.error.HTTPError as error:
        print(f"plugway: the purge failed ({error.code}): {error.read().decode(errors='replace')}", file=sys.stderr)
    except OSError as error:
        print(f"plugway: cannot reach the admin API at {url}: {error}", file=sys.stderr)
    return 1
