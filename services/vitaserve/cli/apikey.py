"""`vita-audio apikey`: a new random API key and the entry that goes into the API keys file.

The key is printed once, for the caller; the file ($VITA_API_KEYS_FILE, a Kubernetes Secret) holds
only its sha256, so a leaked file lets nobody call.
"""

from __future__ import annotations

import argparse
import json
import secrets


def subparser_init(subparsers) -> None:
    p = subparsers.add_parser(
        "apikey", help="make a new API key for a tenant and print its API keys file entry",
        description="Print a new random API key (256 bits) on the first line, for the caller, and on the "
                    "second the JSON entry to add to the \"keys\" list of the gateway's API keys file "
                    "($VITA_API_KEYS_FILE): it holds the key's sha256 only, never the key.")
    p.add_argument("--tenant", required=True, help="the tenant the key calls as (letters, digits, '_', '.', '-')")
    p.add_argument("--id", default=None, help="the key's name in logs and the file (default: a random one)")
    p.add_argument("--scopes", default=None,
                   help="comma-separated RPCs the key may call: converse, synthesize, transcribe (default: all)")
    p.set_defaults(func=cmd)


def new_key_entry(tenant: str, key_id: str | None = None, scopes: list[str] | None = None) -> tuple[str, dict]:
    """(the key, its entry for the API keys file); ValueError on a bad tenant or scope."""
    from vitaserve.common import keys
    from vitaserve.gateway.auth import SCOPES, hash_key

    keys.check_tenant(tenant)
    if scopes is not None and (not scopes or set(scopes) - SCOPES):
        raise ValueError(f"scopes must be some of {', '.join(sorted(SCOPES))}, got {scopes}")
    key = "vk_" + secrets.token_urlsafe(32)
    entry = {"id": key_id or "k_" + secrets.token_hex(4), "tenant": tenant, "sha256": hash_key(key)}
    if scopes is not None:
        entry["scopes"] = sorted(scopes)
    return key, entry


def cmd(args: argparse.Namespace) -> int:
    from vitaserve.cli.main import CLIError

    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()] if args.scopes is not None else None
    try:
        key, entry = new_key_entry(args.tenant, args.id, scopes)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    print(key)
    print(json.dumps(entry))
    return 0
