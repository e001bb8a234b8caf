"""``python -m verger.fast_attention demo|bench`` (console script ``verger-fast-attention``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from verger.core.bench import add_cli_args, positive_int


def _passive_openmp() -> None:
    """On an oversubscribed CPU, re-run with ``OMP_WAIT_POLICY=PASSIVE`` (unless the user chose).

    OpenMP reads the policy when torch loads, before any code here runs, hence the re-exec.
    When the load average exceeds the core count, spin-waiting workers make every parallel
    region cost milliseconds (a 1-token decode step: 60 ms instead of 0.1 ms with 2 threads
    on a shared 2-core VM). On an idle CPU passive waiting is the one that hurts: each parallel
    region then pays a wake-up (~45 µs per batched matmul of a decode step: 0.25 instead of
    0.05 ms per token), so the default policy is kept there. Either way the setting applies to
    both sides of every comparison, and the report records it.
    """
    if "OMP_WAIT_POLICY" in os.environ or os.getloadavg()[0] < (os.cpu_count() or 1):
        return
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    os.execve(sys.executable, [sys.executable, "-m", "verger.fast_attention", *sys.argv[1:]], env)


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Bad demo options end as a usage error (exit 2) before any work starts (the shared
    ones, ``--out``, ``--device``, ``--seed``, and ``--threads`` are checked as they are
    parsed)."""
    if args.command != "demo":
        return
    from verger.fast_attention.demo import check_demo_args

    try:
        check_demo_args(args)
    except ValueError as err:
        parser.error(str(err))


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # a real command line (not a test calling main([...]))
        _passive_openmp()
    parser = argparse.ArgumentParser(prog="verger-fast-attention", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = add_cli_args(
        sub.add_parser("bench", help="speed/memory vs torch SDPA"),
        default_out="build/bench/fast-attention",
    )
    bench.add_argument(
        "--threads", type=positive_int, default=2, help="torch threads for both sides (default 2)"
    )
    demo = add_cli_args(
        sub.add_parser("demo", help="train small LMs: softmax vs linear vs clustered"),
        default_out="build/demo/fast-attention",
    )
    demo.add_argument("--steps", type=int, default=None, help="training steps per model")
    demo.add_argument(
        "--attentions", nargs="+", default=None, metavar="NAME",
        help="a subset of softmax, linear, improved_clustered (default: all three)",
    )  # fmt: skip
    demo.add_argument(
        "--resume", action="store_true",
        help="continue from the checkpoints under OUT/checkpoints (default: start over)",
    )  # fmt: skip
    demo.add_argument(
        "--checkpoint-every", type=int, default=None, metavar="N",
        help="checkpoint every N steps (default: a quarter of the run, at least 10)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    _check_args(parser, args)
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
