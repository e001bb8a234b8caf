"""``python -m verger.fast_attention demo``: small LMs with softmax, linear and improved
clustered attention, trained for the same steps on verger.core's embedded corpus.

Reports validation loss, training throughput, and generation cost per token as the context
grows (the "Transformers are RNNs" claim: constant for linear attention, growing for a
KV-cache softmax model), with plots.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch
from matplotlib.ticker import NullFormatter
from tqdm import tqdm

import verger.fast_attention  # noqa: F401  (registers the attentions)
from verger.core import seed_everything
from verger.core.bench import Report, new_figure
from verger.core.data import ByteTokenizer, PackedDataset, build_corpus, tokenize_corpus
from verger.core.nn import TransformerConfig, TransformerLM


def _attentions(seq_len: int) -> dict[str, dict[str, Any]]:
    clusters = max(4, seq_len // 16)
    return {
        "softmax": {},
        "linear": {},
        "improved_clustered": {"n_clusters": clusters, "topk": 16, "iterations": 5},
    }


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


@torch.no_grad()
def _val_loss(model: TransformerLM, val: PackedDataset, batches: int, batch_size: int) -> float:
    model.eval()
    losses = []
    n = min(len(val), batches * batch_size)
    for start in range(0, n, batch_size):
        x, y = val.batch(torch.arange(start, min(start + batch_size, n)))
        losses.append(float(model(x, targets=y).loss))
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def _generation_ms(model: TransformerLM, context: int, tokens: int, vocab: int) -> float:
    """ms per new token after a prompt of ``context`` tokens (cache reused across steps)."""
    model.eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, context), generator=g)
    out = model(prompt, use_cache=True, return_logits=True)
    cache, nxt = out.cache, prompt[:, -1:]
    start = time.perf_counter()
    for _ in range(tokens):
        out = model(nxt, cache=cache, use_cache=True, return_logits=True)
        cache = out.cache
    model.train()
    return (time.perf_counter() - start) * 1e3 / tokens


def run_demo(args: argparse.Namespace) -> Report:
    quick = bool(args.quick)
    seq_len, batch = (128, 8) if quick else (256, 16)
    steps = args.steps or (60 if quick else 800)
    contexts = [128, 1024] if quick else [256, 1024, 4096, 8192]
    torch.set_num_threads(2)
    train, val = _data(quick, seq_len)
    vocab = ByteTokenizer().vocab_size
    report = Report(args.out, title="verger-fast-attention demo: softmax vs linear vs clustered")
    report.text(
        f"Byte-level LMs (d_model 128, 2 layers, 4 heads) trained {steps} steps of {batch}×"
        f"{seq_len} tokens on the embedded corpus (docs + code); same data order and seed."
    )
    rows, curves, gen = [], {}, {}
    for name, options in _attentions(seq_len).items():
        seed_everything(args.seed)
        cfg = TransformerConfig(
            vocab_size=vocab, d_model=128, n_layers=2, n_heads=4, max_seq_len=max(contexts) + 64,
            attention=name, attention_options=options,
        )  # fmt: skip
        model = TransformerLM(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps))
        )
        g = torch.Generator().manual_seed(args.seed)
        losses, t0 = [], time.perf_counter()
        for _ in tqdm(range(steps), desc=f"train {name}"):
            x, y = train.batch(torch.randint(0, len(train), (batch,), generator=g))
            loss = model(x, targets=y).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        elapsed = time.perf_counter() - t0
        vl = _val_loss(model, val, 8 if quick else 32, batch)
        tps = steps * batch * seq_len / elapsed
        curves[name] = losses
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
