"""Command line: `python -m benchmarks SCENARIO [--quick] [--rate R] [--duration S] [--rounds N] [--json FILE]`.

With no scenario, lists the scenarios.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.scenarios import SCENARIOS, Options


def main(argv: list[str] | None = None) -> int:
    width = max(map(len, SCENARIOS))
    listing = "\n".join(
        f"  {name:<{width}} " + s.summary.replace("\n", "\n" + " " * (width + 3)) for name, s in SCENARIOS.items()
    )
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Hedgerow benchmarks, on loopback, each component in its own process.",
        epilog=f"scenarios:\n{listing}\n\nSee benchmarks/README.md for how to read the figures.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("scenario", nargs="?", choices=SCENARIOS, help="the scenario to run; none: list them")
    parser.add_argument("--quick", action="store_true", help="smoke run for CI: short runs, only correctness counts")
    parser.add_argument("--rate", type=float, help="open-loop arrival rate, req/s (default: the scenario's)")
    parser.add_argument("--duration", type=float, help="seconds per load run (default: the scenario's)")
    parser.add_argument("--rounds", type=int, help="rounds to take medians over (default: the scenario's)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every figure to FILE as JSON")
    args = parser.parse_args(argv)
    if args.scenario is None:
        print(f"scenarios (run one: python -m benchmarks NAME [--quick] [--json FILE]; --help for options):\n{listing}")
        return 0
    if (
        (args.rate is not None and args.rate <= 0)
        or (args.duration is not None and args.duration <= 0)
        or (args.rounds is not None and args.rounds < 1)
    ):
        parser.error("--rate and --duration must be > 0, --rounds ≥ 1")
    options = Options(
        quick=args.quick, rate=args.rate, duration_s=args.duration, rounds=args.rounds, json_path=args.json
    )
    return SCENARIOS[args.scenario].run(options)


if __name__ == "__main__":
    sys.exit(main())
