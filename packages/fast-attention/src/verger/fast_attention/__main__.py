"""``python -m verger.fast_attention demo|bench`` (console script ``verger-fast-attention``)."""

from __future__ import annotations

import os

# Before torch loads OpenMP: on a shared, oversubscribed CPU the default spin-waiting workers
# make every parallel region cost milliseconds (a 1-token decode step went from 0.1 ms to
# 60 ms with 2 threads here). Passive waiting applies to both sides of every comparison.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import sys
from collections.abc import Sequence

from verger.core.bench import add_cli_args


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="verger-fast-attention", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = add_cli_args(
        sub.add_parser("bench", help="speed/memory vs torch SDPA"),
        default_out="build/bench/fast-attention",
    )
    bench.add_argument(
        "--threads", type=int, default=2, help="torch threads for both sides (default 2)"
    )
    demo = add_cli_args(
        sub.add_parser("demo", help="train small LMs: softmax vs linear vs clustered"),
        default_out="build/demo/fast-attention",
    )
    demo.add_argument("--steps", type=int, default=None, help="training steps per model")
    args = parser.parse_args(argv)
    if args.command == "bench":
        from verger.fast_attention.bench import check_targets, run_bench

        report = run_bench(args)
        missed = check_targets(report.metrics)
        print(f"wrote {args.out}/metrics.json")
        for line in missed:
            print("target missed:", line)
        return 0
    from verger.fast_attention.demo import run_demo

    run_demo(args)
    print(f"wrote {args.out}/metrics.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
