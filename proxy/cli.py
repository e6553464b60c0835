"""`hedgerow serve | check-config | keys create|list|disable|delete` and `--version`."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import msgspec

from proxy import __version__
from proxy.accounting.settings import AccountingConfig
from proxy.config import MAX_WORKERS, Config, ConfigError, load, with_server
from proxy.errors import GatewayError
from proxy.store import Store, StoreError, open_store


def _workers(text: str) -> int | str:
    """`--workers`: a count from 1 to MAX_WORKERS, or `auto`."""
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor auto") from None
    if not 1 <= n <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"{n} is not between 1 and {MAX_WORKERS}")
    return n


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hedgerow",
        description="Hedgerow: an OpenAI-compatible LLM edge gateway. One API, many providers.",
        epilog="Run `hedgerow serve` with no config to try the built-in demo provider on 127.0.0.1:8080 "
        "(key: $HEDGEROW_API_KEY, else sk-hedgerow-demo).",
    )
    p.add_argument("--version", action="version", version=f"hedgerow {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser(
        "serve",
        help="run the gateway",
        description="Run the gateway until SIGTERM/SIGINT (which drain in-flight requests). SIGHUP reloads the "
        "config file live: providers, models, prices, keys and routing; a broken file changes nothing.",
    )
    s.add_argument("--config", metavar="FILE", help="YAML or TOML config (default: the embedded demo config)")
    s.add_argument("--host", help="listen address (overrides server.host)")
    s.add_argument("--port", type=int, help="listen port (overrides server.port)")
    s.add_argument(
        "--workers",
        type=_workers,
        metavar="N|auto",
        help="worker processes sharing the port (SO_REUSEPORT); auto (the default): one per CPU this process "
        "may use (affinity and cgroup quota)",
    )
    s.add_argument(
        "--engine", choices=["aiohttp", "lean"], help="HTTP server engine (overrides server.engine; default lean)"
    )
    s.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    c = sub.add_parser(
        "check-config",
        help="validate a config file and report every problem",
        description="Validate a config file; print every problem with the path to its field; exit 1 if any.",
    )
    c.add_argument("file", metavar="FILE")
    _keys_parser(sub)
    return p


def _keys_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="FILE",
        help="YAML or TOML config naming the accounting store "
        "(default: the embedded config, whose store is ./hedgerow.db)",
    )
    k = sub.add_parser(
        "keys",
        help="create, list, disable or delete API keys in the accounting store",
        description="Manage API keys directly in the accounting store the config names (running gateways "
        "pick changes up within accounting.keys-sync-s).",
    )
    ks = k.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    kc = ks.add_parser("create", parents=[common], help="create a key and print its secret (once)")
    kc.add_argument("--label", required=True, help="a name for the key, shown in lists and logs")
    kc.add_argument("--org", help="the organisation whose credits it spends (default: org_default)")
    kc.add_argument("--limit", type=float, metavar="USD", help="spend cap per period (or ever, without --limit-reset)")
    kc.add_argument("--limit-reset", choices=["daily", "weekly", "monthly"], help="when the spend cap starts again")
    kc.add_argument("--rpm", type=int, metavar="N", help="requests per minute")
    kc.add_argument("--tpm", type=int, metavar="N", help="tokens per minute")
    kc.add_argument(
        "--model",
        dest="models",
        action="extend",
        nargs="+",
        metavar="M",
        help="a model the key may use (repeatable; default: every model)",
    )
    kl = ks.add_parser("list", parents=[common], help="list keys")
    kl.add_argument("--org", help="only this organisation's keys")
    for action, text in (("disable", "disable a key (it stays listed)"), ("delete", "delete a key")):
        ka = ks.add_parser(action, parents=[common], help=text)
        ka.add_argument("id", metavar="ID", help="the key's id (key_…)")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "check-config":
        try:
            cfg = load(args.file)
        except ConfigError as e:
            print(f"{args.file}: {len(e.problems)} problem(s):", file=sys.stderr)
            for problem in e.problems:
                print(f"  - {problem}", file=sys.stderr)
            return 1
        print(f"{args.file}: OK ({len(cfg.providers)} providers, {len(cfg.models)} models, {len(cfg.keys)} keys)")
        return 0
    if args.command == "keys":
        return _keys(args)
    if args.command == "serve":
        from proxy.server import configure_logging, run

        configure_logging(args.log_level)
        try:

            def reload() -> Config:  # SIGHUP: the same file (or the embedded default) and the same flags
                return with_server(
                    load(args.config), host=args.host, port=args.port, workers=args.workers, engine=args.engine
                )

            cfg = reload()
        except ConfigError as e:
            print("hedgerow: refusing to start, the config has problems:", file=sys.stderr)
            for problem in e.problems:
                print(f"  - {problem}", file=sys.stderr)
            return 2
        return run(cfg, reload)
    parser.print_help()
    return 0


def _keys(args: argparse.Namespace) -> int:
    try:
        cfg = load(args.config)
    except ConfigError as e:
        print("hedgerow: the config has problems:", file=sys.stderr)
        for problem in e.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    store_cfg = cfg.accounting.store
    # Not the Redis URL: it may hold a password.
    where = f"sqlite store {store_cfg.path}" if store_cfg.kind == "sqlite" else "redis store"
    try:
        return asyncio.run(_keys_command(args, cfg.accounting))
    except StoreError as e:
        print(f"hedgerow: the {where} is unreachable: {e}", file=sys.stderr)
        return 1
    except GatewayError as e:  # the shared key logic's BadRequest / NotFound
        print(f"hedgerow: {e.message}", file=sys.stderr)
        return 1
    except ImportError as e:  # the redis client is an optional dependency
        print(
            f"hedgerow: the {where} needs a package that is not installed ({e.name}): pip install 'hedgerow[redis]'",
            file=sys.stderr,
        )
        return 1


async def _keys_command(args: argparse.Namespace, acc: AccountingConfig) -> int:
    from proxy.accounting.admin import KeySpec, create_key, decode, ensure_orgs  # late: imports aiohttp

    store = open_store(acc.store)
    await store.open()
    try:
        now = time.time()
        if args.keys_command == "create":
            await ensure_orgs(store, acc.orgs, now)  # as the gateway does at startup
            fields = {
                "label": args.label,
                "org": args.org,
                "limit": args.limit,
                "limit_reset": args.limit_reset,
                "rpm": args.rpm,
                "tpm": args.tpm,
                "allowed_models": args.models,
            }
            spec = decode(KeySpec, {k: v for k, v in fields.items() if v is not None})
            key, secret = await create_key(store, spec, now)
            print(f"id:  {key.id}")
            print(f"key: {secret}")
            print("Save the key now: it will not be shown again (only its SHA-256 digest is stored).")
            return 0
        if args.keys_command == "list":
            await _print_keys(store, args.org, now)
            return 0
        key = await store.get_key(args.id)
        if key is None:
            print(f"hedgerow: no key with id {args.id!r}", file=sys.stderr)
            return 1
        if args.keys_command == "disable":
            await store.put_key(msgspec.structs.replace(key, disabled=True, updated_at=now))
            print(f"disabled {key.id} ({key.label})")
        else:
            await store.delete_key(key.id)
            print(f"deleted {key.id} ({key.label})")
        return 0
    finally:
        await store.close()


async def _print_keys(store: Store, org: str | None, now: float) -> None:
    """A table of keys (id, label, org, disabled, limit, settled usage this period); never secrets or digests."""
    keys = await store.list_keys(org)
    if not keys:
        print("no keys" + (f" in {org}" if org else ""))
        return
    rows = [("ID", "LABEL", "ORG", "DISABLED", "LIMIT", "USAGE")]
    for k in keys:
        usage = (await store.key_usage(k.id, k.limit_reset, now)).usage
        limit = "-" if k.limit is None else f"{k.limit:.2f}" + (f"/{k.limit_reset}" if k.limit_reset else "")
        rows.append((k.id, k.label, k.org, "yes" if k.disabled else "no", limit, f"{usage:.6f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())


if __name__ == "__main__":
    sys.exit(main())
