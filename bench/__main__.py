"""python -m bench [GROUP ...] [--json PATH] [--broker URL] [--seconds N] [--plot DIR]"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any, Dict, List

from bench import harness

#: group name -> module defining group() -> harness.Group
GROUPS: Dict[str, str] = {
    "magnet": "bench.magnet_bench",
    "proxy": "bench.proxy_bench",
    "pubsub": "bench.pubsub_bench",
    "memory": "bench.memory_bench",
}


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run ooidx benchmarks; each figure is compared with a baseline measured in the same run.")
    parser.add_argument("groups", nargs="*", metavar="GROUP",
                        help=f"groups to run (default: all): {', '.join(GROUPS)}")
    parser.add_argument("--broker", default=os.environ.get("OOIDX_BENCH_BROKER", harness.DEFAULT_BROKER),
                        help="AMQP broker URL (default: $OOIDX_BENCH_BROKER or %(default)s)")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per run (default 3)")
    parser.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds before each run (default 0.5)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs per side, alternating order; the best counts (default 3)")
    parser.add_argument("--row", metavar="TEXT", action="append", default=[],
                        help="only the rows whose name contains TEXT (repeatable)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as a JSON list to PATH")
    parser.add_argument("--plot", metavar="DIR", help="also write a PNG of each group's ratios to DIR (matplotlib)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every run's figure and tracebacks")
    args = parser.parse_args(argv)
    unknown = [g for g in args.groups if g not in GROUPS]
    if unknown:
        parser.error(f"unknown group(s): {', '.join(unknown)} (known: {', '.join(GROUPS)})")
    if args.seconds <= 0 or args.warmup < 0 or args.rounds < 1:
        parser.error("--seconds must be > 0, --warmup >= 0, --rounds >= 1")
    return args


def main(argv: List[str]) -> int:
    args = parse_args(argv)
    settings = harness.Settings(broker=args.broker, seconds=args.seconds, warmup=args.warmup,
                                rounds=args.rounds, verbose=args.verbose)
    groups = [importlib.import_module(GROUPS[name]).group() for name in (args.groups or list(GROUPS))]
    if args.row:
        for group in groups:
            group.benchmarks = [b for b in group.benchmarks if any(t.lower() in b.name.lower() for t in args.row)]
        groups = [g for g in groups if g.benchmarks]
        if not groups:
            harness.log(f"no row matches {args.row}")
            return 2
    outcome: Dict[str, Any] = {"rows": [], "failed": False}

    def run(reactor: Any) -> Any:
        from twisted.internet.defer import ensureDeferred

        async def all_groups() -> None:
            for group in groups:
                rows, _results = await harness.run_group(reactor, group, settings)
                outcome["rows"].extend(rows)
                print(f"\n{group.name}: {group.description}")
                print(harness.table(rows, group.subject), flush=True)
                if any(r.ratio is None for r in rows):
                    outcome["failed"] = True
                if args.plot:
                    path = harness.plot(group, rows, args.plot)
                    if path:
                        harness.log(f"plot: {path}")

        return ensureDeferred(all_groups())

    from twisted.internet.task import react

    try:
        react(run)
    except SystemExit as e:
        if e.code not in (0, None):
            return int(e.code) if isinstance(e.code, int) else 1
    if args.json:
        harness.write_json(outcome["rows"], args.json)
        harness.log(f"json: {args.json}")
    return 1 if outcome["failed"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
