"""``python -m verger.fast_attention demo``: small LMs with softmax, linear and improved
clustered attention, trained for the same steps on verger.core's embedded corpus.

Reports validation loss, training throughput, and generation cost per token as the context
grows (the "Transformers are RNNs" claim: constant for linear attention, growing for a
KV-cache softmax model), with plots.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from matplotlib.ticker import NullFormatter

import verger.fast_attention  # noqa: F401  (registers the attentions)
from verger.core import seed_everything
from verger.core.bench import Report, new_figure
from verger.core.data import (
    ByteTokenizer,
    DomainSampler,
    PackedDataset,
    build_corpus,
    tokenize_corpus,
    validation_batches,
)
from verger.core.nn import TransformerConfig, TransformerLM
from verger.core.runtime import resolve_device
from verger.core.train import (
    Checkpointer,
    LoopConfig,
    MetricsLogger,
    TrainLoop,
    atomic_write_json,
    cosine_schedule,
    lambda_lr,
    read_metrics,
)

ATTENTIONS = ("softmax", "linear", "improved_clustered")


def _attention_options(name: str, seq_len: int) -> dict[str, Any]:
    if name == "improved_clustered":
        return {"n_clusters": max(4, seq_len // 16), "topk": 16, "iterations": 5}
    return {}


def _data(quick: bool, seq_len: int) -> tuple[PackedDataset, PackedDataset]:
    corpus = build_corpus(
        domains=["docs", "code"],
        max_bytes_per_domain=300_000 if quick else 2_000_000,
        progress=False,
    )
    tok = ByteTokenizer()
    train = torch.cat(list(tokenize_corpus(corpus, tok, "train").values()))
    val = torch.cat(list(tokenize_corpus(corpus, tok, "validation").values()))
    return PackedDataset(train, seq_len), PackedDataset(val, seq_len)


def _prepare_out(out: Path, run: dict[str, Any], resume: bool) -> None:
    """A fresh run drops an earlier run's checkpoints and logs; ``resume`` checks that the
    checkpoints come from the same settings (a different step count or batch would silently
    continue another schedule)."""
    stamp = out / "checkpoints" / "run.json"
    if resume and stamp.is_file():
        try:
            saved = json.loads(stamp.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(
                f"{stamp} is corrupt ({exc}); run without --resume to start over"
            ) from None
        if saved != run:
            changed = {k: (saved.get(k), v) for k, v in run.items() if saved.get(k) != v}
            raise ValueError(
                f"--resume: the checkpoints in {stamp.parent} come from other settings "
                f"(saved, now): {changed}; rerun with the saved settings, or without --resume "
                "to start over"
            )
    if not resume:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        shutil.rmtree(out / "logs", ignore_errors=True)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stamp, run)


def _step_records(log: Path) -> list[dict[str, Any]]:
    """One record per step, the last written: a resumed run logs again the steps after its
    checkpoint (identical losses, later times)."""
    by_step = {r["step"]: r for r in read_metrics(log) if "loss" in r}
    return [by_step[s] for s in sorted(by_step)]


def _median_step_seconds(records: list[dict[str, Any]]) -> float:
    """Median wall time between consecutive logged steps: unaffected by the pause of a
    checkpoint save or of a resume, and the same whether or not the run was resumed."""
    gaps = [
        b["time"] - a["time"] for a, b in itertools.pairwise(records) if b["step"] == a["step"] + 1
    ]
    return statistics.median(gaps) if gaps else float("nan")


@torch.no_grad()
def _val_loss(model: TransformerLM, val: PackedDataset, batches: int, batch_size: int) -> float:
    model.eval()
    device = next(model.parameters()).device
    losses = [
        float(model(x.to(device), targets=y.to(device)).loss)
        for x, y in validation_batches(val, batch_size, max_batches=batches)
    ]
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def _generation_ms(model: TransformerLM, context: int, tokens: int, vocab: int) -> float:
    """ms per new token after a prompt of ``context`` tokens (cache reused across steps)."""
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, context), generator=g).to(device)
    out = model(prompt, use_cache=True, return_logits=True)
    cache, nxt = out.cache, prompt[:, -1:]
    _sync(device)
    start = time.perf_counter()
    for _ in range(tokens):
        out = model(nxt, cache=cache, use_cache=True, return_logits=True)
        cache = out.cache
    _sync(device)
    model.train()
    return (time.perf_counter() - start) * 1e3 / tokens


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train(
    model: TransformerLM,
    name: str,
    train: PackedDataset,
    args: argparse.Namespace,
    run: dict[str, Any],
    device: torch.device,
) -> list[dict[str, Any]]:
    """Train ``model`` with verger.core's loop (checkpoints under ``out/checkpoints/<name>``,
    one JSONL record per step under ``out/logs/<name>``); returns the per-step records."""
    steps = run["steps"]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = lambda_lr(opt, cosine_schedule(steps, warmup_steps=min(20, steps // 10), min_ratio=0))
    # its own sampler per model, seeded alike: every attention sees the same batches
    sampler = DomainSampler({"train": train}, [1.0], batch_size=run["batch"], seed=run["seed"])
    every = args.checkpoint_every
    if every is None:
        every = max(10, steps // 4)
    with MetricsLogger(args.out / "logs" / name, tensorboard=False) as logger:
        loop = TrainLoop(
            model,
            opt,
            config=LoopConfig(max_steps=steps, grad_clip=1.0, log_every=1, checkpoint_every=every),
            scheduler=sched,
            checkpointer=Checkpointer(args.out / "checkpoints" / name, keep=1),
            logger=logger,
            loss_fn=lambda m, b: m(b[0].to(device), targets=b[1].to(device)).loss,
            desc=f"train {name}",
        )
        loop.run(sampler, resume=args.resume)
    return _step_records(args.out / "logs" / name / "metrics.jsonl")


def check_demo_args(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` naming the bad option before any work starts."""
    if args.steps is not None and args.steps < 2:
        raise ValueError(f"--steps {args.steps}: must be >= 2 (throughput is a median step time)")
    unknown = [n for n in args.attentions or () if n not in ATTENTIONS]
    if unknown:
        raise ValueError(f"--attentions: unknown {unknown}; choose from {list(ATTENTIONS)}")
    every = args.checkpoint_every
    if every is not None and (not isinstance(every, int) or every < 0):
        raise ValueError(f"--checkpoint-every {every}: must be >= 0 (0: only at the end)")


def run_demo(args: argparse.Namespace) -> Report:
    """Train, evaluate and time each attention; ``args`` as ``check_demo_args`` accepts them
    (the CLI checks them first, so a bad option is a usage error before any work)."""
    quick = bool(args.quick)
    seq_len, batch = (128, 8) if quick else (256, 16)
    steps = args.steps if args.steps is not None else (60 if quick else 800)
    names = list(dict.fromkeys(args.attentions or ATTENTIONS))
    contexts = [128, 1024] if quick else [256, 1024, 4096, 8192]
    device = resolve_device(args.device)
    torch.set_num_threads(2)
    run = {"quick": quick, "steps": steps, "seq_len": seq_len, "batch": batch, "seed": args.seed}
    _prepare_out(args.out, run, args.resume)
    train, val = _data(quick, seq_len)
    vocab = ByteTokenizer().vocab_size
    report = Report(args.out, title="verger-fast-attention demo: softmax vs linear vs clustered")
    report.text(
        f"Byte-level LMs (d_model 128, 2 layers, 4 heads) trained {steps} steps of {batch}×"
        f"{seq_len} tokens on the embedded corpus (docs + code), device {device}; same data "
        "order and seed. Training throughput is the median step time."
    )
    rows, curves, gen = [], {}, {}
    for name in names:
        seed_everything(args.seed)
        cfg = TransformerConfig(
            vocab_size=vocab, d_model=128, n_layers=2, n_heads=4, max_seq_len=max(contexts) + 64,
            attention=name, attention_options=_attention_options(name, seq_len),
        )  # fmt: skip
        model = TransformerLM(cfg).to(device)
        records = _train(model, name, train, args, run, device)
        vl = _val_loss(model, val, 8 if quick else 32, batch)
        tps = batch * seq_len / _median_step_seconds(records)
        curves[name] = [r["loss"] for r in records]
        gen[name] = {c: _generation_ms(model, c, 8 if quick else 32, vocab) for c in contexts}
        report.metric(f"val_loss_{name}", vl)
        report.metric(f"train_tokens_per_s_{name}", tps)
        for c, ms in gen[name].items():
            report.metric(f"generation_ms_per_token_{name}_ctx{c}", ms)
        rows.append({"attention": name, "val loss": vl, "train tok/s": tps}
                    | {f"gen ms/tok @{c}": ms for c, ms in gen[name].items()})  # fmt: skip
    c0, c1 = contexts[0], contexts[-1]
    for name in gen:
        report.metric(
            f"generation_growth_{name}_ctx{c1}_over_ctx{c0}", gen[name][c1] / gen[name][c0]
        )
    report.table("Small LMs, same steps", rows)
    fig, ax = new_figure()
    for name, losses in curves.items():
        k = max(1, len(losses) // 50)
        smooth = [sum(losses[i : i + k]) / len(losses[i : i + k]) for i in range(0, len(losses), k)]
        ax.plot([i * k for i in range(len(smooth))], smooth, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/byte)")
    ax.legend()
    report.plot("train_loss", fig)
    fig, ax = new_figure()
    for name, per_ctx in gen.items():
        ax.loglog(list(per_ctx), list(per_ctx.values()), "o-", label=name)
    ax.set_xticks(contexts, [str(c) for c in contexts])  # no crowded minor log labels
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("context length")
    ax.set_ylabel("ms per generated token")
    ax.legend()
    report.plot("generation_ms_per_token", fig)
    report.write()
    return report
