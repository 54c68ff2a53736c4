"""``plugway apikey new`` and ``plugway oauth-client new``: a new secret, printed once, with
the configuration lines that hold only its hash."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from . import apikeys, passwords
from .identity import ANONYMOUS, header_safe


def add_commands(commands: Any) -> None:
    apikey = commands.add_parser("apikey", help="API keys of the auth plugin",
                                 description="API keys of the auth plugin")
    apikey_commands = apikey.add_subparsers(metavar="ACTION", required=True)
    new = apikey_commands.add_parser("new", help="print a new API key once, and the configuration lines with its hash")
    new.add_argument("--consumer", required=True, help="consumer id the key authenticates as")
    new.add_argument("--roles", default="", help="comma-separated roles")
    new.add_argument("--scopes", default="", help="comma-separated scopes")
    new.add_argument("--expires", help="expiry, e.g. 2027-01-31T00:00:00Z")
    new.set_defaults(command=new_api_key)

    client = commands.add_parser("oauth-client", help="clients of the auth plugin's token endpoint",
                                 description="clients of the auth plugin's token endpoint")
    client_commands = client.add_subparsers(metavar="ACTION", required=True)
    new = client_commands.add_parser("new",
                                     help="print a new client secret once, and the configuration lines with its hash")
    new.add_argument("--id", required=True, help="client id")
    new.add_argument("--scopes", default="", help="comma-separated scopes the client may request")
    new.add_argument("--roles", default="", help="comma-separated roles put in its tokens")
    new.set_defaults(command=new_client)


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _valid(name: str, *, spaces: bool = False) -> bool:
    return bool(name) and header_safe(name) and '"' not in name and "\\" not in name and "," not in name and (
        spaces or " " not in name)


def new_api_key(args: argparse.Namespace) -> int:
    roles, scopes = _names(args.roles), _names(args.scopes)
    if not _valid(args.consumer) or args.consumer == ANONYMOUS or not all(map(_valid, roles + scopes)):
        print("plugway apikey new: consumer, roles and scopes must be visible ASCII without spaces, quotes "
              f'or commas (and the consumer not "{ANONYMOUS}")', file=sys.stderr)
        return 2
    if args.expires:
        try:
            apikeys.parse_time(args.expires)
        except ValueError as exc:
            print(f"plugway apikey new: --expires: {exc}", file=sys.stderr)
            return 2
    key = apikeys.new_key()
    print(f"API key for {args.consumer} (shown only now; store it in your secret manager):")
    print(key)
    print()
    print("Add to the configuration (only the hash; keep older keys listed until clients have switched):")
    print(apikeys.config_block(apikeys.hash_key(key), args.consumer, roles, scopes, args.expires))
    return 0


def new_client(args: argparse.Namespace) -> int:
    scopes, roles = _names(args.scopes), _names(args.roles)
    if not _valid(args.id) or not all(map(_valid, scopes + roles)):
        print("plugway oauth-client new: id, scopes and roles must be visible ASCII without spaces, quotes or commas",
              file=sys.stderr)
        return 2
    secret = passwords.new_secret()
    print(f"Client secret for {args.id} (shown only now; give it to the client over a secure channel):")
    print(secret)
    print()
    print("Add to the configuration (only the salted scrypt hash):")
    lines = ["[[plugins.auth.token_endpoint.clients]]", f"id = {json.dumps(args.id)}",
             f'secret_hash = "{passwords.hash_secret(secret)}"']
    if scopes:
        lines.append(f"scopes = {json.dumps(scopes)}")
    if roles:
        lines.append(f"roles = {json.dumps(roles)}")
    print("\n".join(lines))
    return 0
