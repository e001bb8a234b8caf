"""``python -m verger.sparse_diloco train|demo|bench`` (console script ``verger-sparse-diloco``).

- ``train``: one run (simulated workers, or one worker per rank under torchrun) with
  checkpoints; resumes from ``--checkpoint-dir`` when it holds a complete round.
- ``demo``: 4 gloo worker processes on the embedded corpus, DiLoCo vs partial updates.
- ``bench``: the ratios of partial updates vs DiLoCo (see the README for the metric names).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from verger.core.bench import add_cli_args, positive_int

if TYPE_CHECKING:
    from verger.sparse_diloco.runner import TrainSpec

LM_SIZES = ("tiny", "small", "125m", "1.3b")  # verger.sparse_diloco.lm.LM_SIZES (test-checked)


def _train_spec(args: argparse.Namespace) -> TrainSpec:
    """The run ``args`` describe; raises ``ValueError`` on a bad value (a usage error)."""
    from verger.sparse_diloco.config import DiLoCoConfig
    from verger.sparse_diloco.runner import TrainSpec

    device = (
        "cuda"
        if args.device == "auto" and _cuda()
        else ("cpu" if args.device == "auto" else args.device)
    )
    task_options = dict(
        size=args.size, seq_len=args.seq_len, batch_size=args.batch_size, device=device
    )
    config = DiLoCoConfig(
        num_workers=args.workers,
        inner_steps=args.inner_steps,
        inner_lr=args.inner_lr,
        inner_warmup=args.warmup,
        outer_lr=args.outer_lr,
        outer_momentum=args.outer_momentum,
        num_fragments=args.fragments,
        compression_bits=args.bits,
        partial_lr_scaling=args.partial_lr_scaling,
        outer_lr_scaling=args.outer_lr_scaling,
    )
    return TrainSpec(
        task="lm",
        task_options=task_options,
        plan=args.plan,
        num_slices=args.num_slices,
        overlap=args.overlap,
        others=args.others,
        config=config,
        rounds=args.rounds,
        seed=args.seed,
        checkpoint_dir=str(args.checkpoint_dir or args.out / "checkpoints"),
        inner_engine=args.inner_engine,
        zero_stage=args.zero_stage,
    )


def _train(spec: TrainSpec, args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from verger.core.files import atomic_write_text
    from verger.sparse_diloco.runner import distributed_main, train_run

    if "RANK" in os.environ:  # launched by torchrun: one worker per rank
        from verger.core.distributed import init_distributed

        init_distributed()
        if dist.get_backend() == "nccl":
            spec.task_options["device"] = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        result = distributed_main(spec)
        main_rank = dist.get_rank() == 0
    else:
        result = train_run(spec, progress=lambda r, f: print(f"round {r}: {f}", flush=True))
        main_rank = True
    if main_rank:
        summary = {
            "final_val_loss": result["history"][-1]["val_loss"] if result["history"] else None,
            "bytes_sent": result["bytes_sent"],
            "resumed_from": result["resumed_from"],
        }
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "metrics.json", json.dumps(summary, indent=2))
        print(json.dumps(summary))
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="verger-sparse-diloco", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("demo", "bench"):
        add_cli_args(
            sub.add_parser(name, help=f"run the {name}"), default_out=f"build/{name}/sparse-diloco"
        )
    train = add_cli_args(
        sub.add_parser("train", help="train a LM with DiLoCo / partial updates"),
        default_out="build/train/sparse-diloco",
    )
    train.add_argument("--size", default="tiny", choices=LM_SIZES)
    train.add_argument("--plan", default="mlp", choices=["full", "mlp"], help="full = DiLoCo")
    train.add_argument("--num-slices", type=int, default=None, help="k of '1/k MLP' (default W)")
    train.add_argument("--overlap", type=float, default=0.0)
    train.add_argument("--others", default="shared", choices=["shared", "frozen"])
    train.add_argument("--workers", type=int, default=4)
    train.add_argument("--inner-steps", type=int, default=50)
    train.add_argument("--inner-lr", type=float, default=2e-3)
    train.add_argument("--warmup", type=int, default=10)
    train.add_argument("--outer-lr", type=float, default=0.7)
    train.add_argument("--outer-momentum", type=float, default=0.9)
    train.add_argument(
        "--partial-lr-scaling",
        default="sqrt",
        choices=["sqrt", "none"],
        help="sqrt: a worker training a fraction f of the model uses inner lr / sqrt(f)",
    )
    train.add_argument(
        "--outer-lr-scaling",
        default="sqrt_count",
        choices=["sqrt_count", "none"],
        help="sqrt_count: outer step of coordinate i scaled by sqrt(m[i] / W)",
    )
    train.add_argument("--fragments", type=int, default=1, help="> 1: streaming DiLoCo")
    train.add_argument("--bits", type=int, default=32, choices=[4, 8, 32])
    train.add_argument("--rounds", type=int, default=10)
    train.add_argument("--seq-len", type=positive_int, default=64)
    train.add_argument("--batch-size", type=positive_int, default=4)
    train.add_argument("--checkpoint-dir", default=None)
    train.add_argument(
        "--inner-engine",
        default="torch",
        choices=["torch", "deepspeed"],
        help="deepspeed: under torchrun, each worker is a ZeRO island (over all ranks, or "
        "over R ranks when the world is W x R with R > 1)",
    )
    train.add_argument("--zero-stage", type=int, default=2, choices=[1, 2])
    args = parser.parse_args(argv)
    if args.device in ("auto", "cpu") and "RANK" not in os.environ:
        import torch

        # one thread: small matmuls on a shared CPU lose more to thread contention than they
        # gain (and the simulated workers run one after another anyway)
        torch.set_num_threads(int(os.environ.get("VERGER_THREADS", "1")))
    if args.command == "train":
        if args.quick:
            # at most 10 inner steps, kept a multiple of --fragments when that is possible
            steps = min(args.inner_steps, 10)
            if args.fragments >= 1 and args.inner_steps % args.fragments == 0:
                steps = max(args.fragments, steps - steps % args.fragments)
            args.rounds, args.inner_steps = min(args.rounds, 3), steps
        try:  # bad values are usage errors (exit 2), caught before any work starts
            spec = _train_spec(args)
        except ValueError as exc:
            train.error(str(exc))
        return _train(spec, args)
    if args.command == "bench":
        from verger.sparse_diloco.bench import run_bench

        metrics = run_bench(args.out, quick=args.quick, seed=args.seed)
    else:
        from verger.sparse_diloco.demo import run_demo

        metrics = run_demo(args.out, quick=args.quick, seed=args.seed)
    print(json.dumps(metrics, indent=2))
    print(f"wrote {args.out}/metrics.json and report.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
