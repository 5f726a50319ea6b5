"""`sd-triton gateway` and `sd-triton keys ...`: registered on the `sd-triton` parser by `add_parser`.
Light at import: FastAPI and the rest load when a command runs ([gateway] extra)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("sd_triton")


def _gateway(args: argparse.Namespace) -> int:
    from sd_triton.gateway.main import serve
    from sd_triton.gateway.settings import GatewaySettings

    overrides = {
        k: v for k, v in (("triton_url", args.triton_url), ("host", args.host), ("port", args.port)) if v
    }
    settings = GatewaySettings(**overrides)
    serve(settings)
    return 0


def _keys(args: argparse.Namespace) -> int:
    from sd_triton.gateway.access.keys import create_key, read_key_file, revoke_key

    if args.keys_file:
        path = Path(args.keys_file)
    else:
        from sd_triton.gateway.settings import GatewaySettings

        path = Path(GatewaySettings().keys_file)  # SD_GATEWAY_KEYS_FILE, or the state directory's
    path = path.resolve()
    if args.keys_command == "create":
        created = create_key(
            path,
            args.name,
            rate_limit_per_min=args.rate_limit,
            images_per_day=args.images_per_day,
            max_concurrency=args.concurrency,
            block_words=args.block_word,
            block_regexes=args.block_regex,
        )
        key = created.key
        # the command's output: shown this once, the file keeps only the token's hash
        print(f"id: {key.id}")
        print(f"name: {key.name}")
        print(f"token: {created.token}")
        print(f"webhook_secret: {key.webhook_secret}")
        print(f"keys_file: {path}")
        log.info("created key %s in %s; the token is not shown again", key.id, path)
        log.info(
            "a gateway reads this file when it runs with SD_GATEWAY_KEYS_FILE=%s (or the same "
            "SD_TRITON_STATE_DIR); from now on it refuses /v1 requests without a key",
            path,
        )
    elif args.keys_command == "list":
        keys = read_key_file(path).keys
        print("id            name                 created_at                 revoked_at                 "
              "rate/min  images/day  concurrency  rules")  # fmt: skip
        for key in keys:
            limits = [str(v) if v is not None else "-" for v in
                      (key.rate_limit_per_min, key.images_per_day, key.max_concurrency)]  # fmt: skip
            rules = len(key.block_words) + len(key.block_regexes)
            print(
                f"{key.id:<13} {key.name[:20]:<20} {key.created_at:<26} {key.revoked_at or '-':<26} "
                f"{limits[0]:>8}  {limits[1]:>10}  {limits[2]:>11}  {rules}"
            )
        log.info("%d key(s) in %s", len(keys), path)
    else:
        key = revoke_key(path, args.id)
        log.info("key %s (%s) revoked at %s", key.id, key.name, key.revoked_at)
    return 0


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def add_parser(sub: Any) -> None:
    """Register `gateway` and `keys` (create, list, revoke)."""
    gw = sub.add_parser("gateway", help="run the HTTP gateway (settings also from SD_GATEWAY_* variables)")
    gw.add_argument("--triton-url", default=None, help="Triton gRPC HOST:PORT (default localhost:8001)")
    gw.add_argument("--host", default=None, help="default 127.0.0.1")
    gw.add_argument("--port", type=int, default=None, help="default 8080")
    gw.set_defaults(run=_gateway, extra="gateway")

    keys = sub.add_parser("keys", help="the gateway's API keys: create, list, revoke (docs/access.md)")
    where = (
        "the registry file; default: SD_GATEWAY_KEYS_FILE, else api-keys.json in the state directory "
        "(SD_TRITON_STATE_DIR, else ~/.local/state/sd-triton), the file a gateway with the same settings "
        "reads"
    )
    keys.add_argument("--keys-file", default=None, help=where)
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="a new key; prints its token and webhook secret once")
    create.add_argument("--name", required=True)
    create.add_argument("--rate-limit", type=_positive_int, default=None, help="requests per minute")
    create.add_argument("--images-per-day", type=_positive_int, default=None, help="images per UTC day")
    create.add_argument("--concurrency", type=_positive_int, default=None, help="requests at once")
    create.add_argument("--block-word", action="extend", nargs="+", default=[], help="refused words")
    create.add_argument("--block-regex", action="extend", nargs="+", default=[], help="refused regexes")
    keys_sub.add_parser("list", help="every key with its limits (no secrets)")
    revoke = keys_sub.add_parser("revoke", help="revoke a key (the running gateway notices within 1 s)")
    revoke.add_argument("id")
    for parser_ in (create, keys_sub.choices["list"], revoke):
        parser_.add_argument("--keys-file", default=argparse.SUPPRESS, help=where)
    keys.set_defaults(run=_keys, extra="gateway")
