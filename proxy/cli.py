"""`hedgerow serve | check-config` and `--version`."""

from __future__ import annotations

import argparse
import sys

from proxy import __version__
from proxy.config import ConfigError, load, with_server


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hedgerow",
        description="Hedgerow: an OpenAI-compatible LLM edge gateway. One API, many providers.",
        epilog="Run `hedgerow serve` with no config to try the built-in demo provider on 127.0.0.1:8080 "
        "(key: $HEDGEROW_API_KEY, else sk-hedgerow-demo).",
    )
    p.add_argument("--version", action="version", version=f"hedgerow {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("serve", help="run the gateway", description="Run the gateway until SIGTERM/SIGINT.")
    s.add_argument("--config", metavar="FILE", help="YAML or TOML config (default: the embedded demo config)")
    s.add_argument("--host", help="listen address (overrides server.host)")
    s.add_argument("--port", type=int, help="listen port (overrides server.port)")
    s.add_argument("--workers", type=int, metavar="N", help="worker processes sharing the port (SO_REUSEPORT)")
    s.add_argument("--engine", choices=["aiohttp", "lean"], help="HTTP server engine (overrides server.engine)")
    s.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    c = sub.add_parser(
        "check-config",
        help="validate a config file and report every problem",
        description="Validate a config file; print every problem with the path to its field; exit 1 if any.",
    )
    c.add_argument("file", metavar="FILE")
    return p


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
    if args.command == "serve":
        from proxy.server import configure_logging, run

        configure_logging(args.log_level)
        try:
            cfg = with_server(
                load(args.config), host=args.host, port=args.port, workers=args.workers, engine=args.engine
            )
        except ConfigError as e:
            print("hedgerow: refusing to start, the config has problems:", file=sys.stderr)
            for problem in e.problems:
                print(f"  - {problem}", file=sys.stderr)
            return 2
        return run(cfg)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
