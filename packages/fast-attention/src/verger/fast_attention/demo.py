"""``python -m verger.fast_attention demo``: small LMs with softmax, linear and improved
clustered attention, trained for the same steps on verger.core's embedded corpus.

Reports validation loss, training throughput, and generation cost per token as the context
grows (the "Transformers are RNNs" claim: constant for linear attention, growing for a
KV-cache softmax model), with plots.
"""

from __future__ import annotations

import itertools
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
from verger.core.runs import Run
from verger.core.train import (
    Checkpointer,
    LoopConfig,
    MetricsLogger,
    TrainLoop,
    cosine_schedule,
    lambda_lr,
    read_metrics,
)
from verger.fast_attention.clustered_accuracy import capture_qkv, save_qkv
from verger.fast_attention.settings import DemoSettings, describe_machine

QKV_FILE = "model_qkv.pt"  # the softmax model's last layer q, k, v (clustered accuracy bench)
QKV_TOKENS = 4096


def _attention_options(name: str, seq_len: int) -> dict[str, Any]:
    if name == "improved_clustered":
        return {"n_clusters": max(4, seq_len // 16), "topk": 16, "iterations": 5}
    return {}


def _data(settings: DemoSettings, *, rebuild: bool = False) -> tuple[PackedDataset, PackedDataset]:
    corpus = build_corpus(
        domains=["docs", "code"],
        max_bytes_per_domain=settings.corpus_bytes,
        progress=False,
        rebuild=rebuild,
    )
    seq_len = settings.seq_len
    tok = ByteTokenizer()
    train = torch.cat(list(tokenize_corpus(corpus, tok, "train").values()))
    val = torch.cat(list(tokenize_corpus(corpus, tok, "validation").values()))
    return PackedDataset(train, seq_len), PackedDataset(val, seq_len)


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


def train_model(
    model: TransformerLM,
    train: PackedDataset,
    settings: DemoSettings,
    *,
    logs: Path,
    checkpoints: Path,
    device: torch.device,
    seed: int,
    resume: bool,
    desc: str,
) -> list[dict[str, Any]]:
    """Train ``model`` with verger.core's loop (checkpoints under ``checkpoints``, one JSONL
    record per step under ``logs``; ``resume`` continues from the last checkpoint); returns
    the per-step records."""
    steps = settings.steps
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = lambda_lr(opt, cosine_schedule(steps, warmup_steps=min(20, steps // 10), min_ratio=0))
    # its own sampler per model, seeded alike: every attention sees the same batches
    sampler = DomainSampler({"train": train}, [1.0], batch_size=settings.batch_size, seed=seed)
    with MetricsLogger(logs, tensorboard=False) as logger:
        loop = TrainLoop(
            model,
            opt,
            config=LoopConfig(
                max_steps=steps, grad_clip=1.0, log_every=1, checkpoint_every=settings.every()
            ),
            scheduler=sched,
            checkpointer=Checkpointer(checkpoints, keep=1),
            logger=logger,
            loss_fn=lambda m, b: m(b[0].to(device), targets=b[1].to(device)).loss,
            desc=desc,
        )
        loop.run(sampler, resume=resume)
    return _step_records(logs / "metrics.jsonl")


def _model(name: str, settings: DemoSettings, vocab: int, device: torch.device) -> TransformerLM:
    cfg = TransformerConfig(
        vocab_size=vocab, d_model=128, n_layers=2, n_heads=4,
        max_seq_len=max(max(settings.contexts), settings.seq_len) + 64,
        attention=name, attention_options=_attention_options(name, settings.seq_len),
    )  # fmt: skip
    return TransformerLM(cfg).to(device)


def trained_qkv(
    settings: DemoSettings, folder: Path, *, device: torch.device, seed: int, resume: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The demo's softmax LM trained under ``folder`` (``logs/``, ``checkpoints/``), and its
    last layer's q, k, v over up to 4096 validation tokens (the clustered accuracy bench)."""
    train, val = _data(settings)
    seed_everything(seed)
    model = _model("softmax", settings, ByteTokenizer().vocab_size, device)
    train_model(
        model, train, settings, logs=folder / "logs", checkpoints=folder / "checkpoints",
        device=device, seed=seed, resume=resume, desc="train softmax LM",
    )  # fmt: skip
    n = min(QKV_TOKENS, model.config.max_seq_len, val.tokens.numel())
    return capture_qkv(model, val.tokens[:n][None].to(device))


def run_demo(settings: DemoSettings, run: Run) -> Report:
    """Train, evaluate and time each attention into the run folder (``logs/<name>``,
    ``checkpoints/<name>``, ``model_qkv.pt``); ``run.resumed`` continues each model from its
    last checkpoint."""
    device = run.device
    steps, seq_len, batch = settings.steps, settings.seq_len, settings.batch_size
    contexts = list(settings.contexts)
    train, val = _data(settings, rebuild=run.rebuild_corpus)
    vocab = ByteTokenizer().vocab_size
    logs, checkpoints = run.path("logs"), run.path("checkpoints")
    report = run.report("verger-fast-attention demo: softmax vs linear vs clustered")
    machine = describe_machine(device)
    report.metric("device", str(device))
    report.metric("machine", machine)
    report.text(
        f"Byte-level LMs (d_model 128, 2 layers, 4 heads) trained {steps} steps of {batch}×"
        f"{seq_len} tokens on the embedded corpus (docs + code), on {machine}; same data "
        "order and seed. Training throughput is the median step time."
    )
    rows, curves, gen = [], {}, {}
    for name in settings.attentions:
        seed_everything(run.seed)
        model = _model(name, settings, vocab, device)
        records = train_model(
            model, train, settings, logs=logs / name, checkpoints=checkpoints / name,
            device=device, seed=run.seed, resume=run.resumed, desc=f"train {name}",
        )  # fmt: skip
        if name == "softmax":  # real queries for the clustered attention accuracy bench
            n = min(QKV_TOKENS, model.config.max_seq_len, val.tokens.numel())
            qkv = capture_qkv(model, val.tokens[:n][None].to(device))
            save_qkv(run.path(QKV_FILE), *qkv)
        vl = _val_loss(model, val, settings.val_batches, batch)
        tps = batch * seq_len / _median_step_seconds(records)
        curves[name] = [r["loss"] for r in records]
        tokens = settings.generation_tokens
        gen[name] = {c: _generation_ms(model, c, tokens, vocab) for c in contexts}
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
    run.path("train_loss.png")
    report.plot("train_loss", fig)
    fig, ax = new_figure()
    for name, per_ctx in gen.items():
        ax.loglog(list(per_ctx), list(per_ctx.values()), "o-", label=name)
    ax.set_xticks(contexts, [str(c) for c in contexts])  # no crowded minor log labels
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("context length")
    ax.set_ylabel("ms per generated token")
    ax.legend()
    run.path("generation_ms_per_token.png")
    report.plot("generation_ms_per_token", fig)
    return report
