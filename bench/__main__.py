"""``python -m bench gateway|worker|e2e|recovery|memory|ghosts [--smoke|--full]``: run one benchmark, print,
write JSON."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from pathlib import Path

BENCHMARKS = ("gateway", "worker", "e2e", "recovery", "memory", "ghosts")
# Benchmarks whose default size is smaller than the issue's, which --full runs.
FULL_SIZE = ("ghosts",)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("name", choices=[*BENCHMARKS, "all"])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds; checks that it runs")
    parser.add_argument("--full", action="store_true", help=f"the issue's full size ({', '.join(FULL_SIZE)})")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default bench/results)")
    parser.add_argument("--budget-factor", type=float, default=1.0,
                        help="ghosts: the checkOnline budget (and RongCloud's limit) times this")  # fmt: skip
    args = parser.parse_args()
    if args.full and (args.smoke or args.name not in FULL_SIZE):
        parser.error(f"--full applies to {', '.join(FULL_SIZE)} alone, without --smoke")
    if args.budget_factor <= 0 or (args.budget_factor != 1.0 and args.name != "ghosts"):
        parser.error("--budget-factor applies to ghosts alone, and must be above 0")
    extra = {"budget_factor": args.budget_factor} if args.name == "ghosts" else {}
    # SIGTERM unwinds like Ctrl-C, so the broker and every process a benchmark started are stopped.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    for name in BENCHMARKS if args.name == "all" else (args.name,):
        module = importlib.import_module(f"bench.{name}")
        if args.full:
            module.run(smoke=False, out_dir=args.out, full=True, **extra)
        else:
            module.run(smoke=args.smoke, out_dir=args.out, **extra)


if __name__ == "__main__":
    main()
