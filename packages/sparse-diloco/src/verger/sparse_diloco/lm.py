"""The language-model task: verger.core's TransformerLM on the embedded corpus (byte tokens).

Sizes: ``tiny`` (CPU benchmarks and demo, ~1M parameters), ``125m`` and ``1.3b`` (GPU runs
under torchrun). Batches are a pure function of (seed, worker, step) over the packed training
sequences, so data position is one integer per worker and resume is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from verger.core.data import ByteTokenizer, PackedDataset, build_corpus, tokenize_documents
from verger.core.nn import TransformerConfig, TransformerLM
from verger.sparse_diloco.runner import Task, register_task

LM_SIZES: dict[str, dict[str, Any]] = {
    # d_model, layers, heads, SwiGLU hidden (4x: the MLP dominates, as in the paper's models)
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, mlp_hidden=512, max_seq_len=128),
    "small": dict(d_model=256, n_layers=4, n_heads=4, mlp_hidden=1024, max_seq_len=128),
    "125m": dict(d_model=768, n_layers=12, n_heads=12, mlp_hidden=3072, max_seq_len=1024),
    "1.3b": dict(d_model=2048, n_layers=24, n_heads=16, mlp_hidden=8192, max_seq_len=2048),
}


def lm_config(size: str = "tiny", **overrides: Any) -> TransformerConfig:
    """A byte-level `TransformerConfig` of a named size (``LM_SIZES``)."""
    if size not in LM_SIZES:
        raise ValueError(f"size={size!r} must be one of {sorted(LM_SIZES)}")
    fields = dict(vocab_size=ByteTokenizer.vocab_size, dropout=0.0, **LM_SIZES[size])
    fields.update(overrides)
    return TransformerConfig(**fields)


@dataclass
class LMData:
    """Random training windows per (worker, step); fixed validation windows."""

    train: PackedDataset
    val: PackedDataset
    batch_size: int
    seed: int = 0

    def batch(self, worker: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + worker * 100_003 + step)
        index = torch.randint(len(self.train), (self.batch_size,), generator=gen)
        return self.train.batch(index)

    def val_batches(self, max_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        n = min(len(self.val), max_batches * self.batch_size)
        return [
            self.val.batch(torch.arange(s, min(s + self.batch_size, n)))
            for s in range(0, n, self.batch_size)
        ]


DOMAINS = ("code", "docs")
MAX_BYTES_PER_DOMAIN = 2_000_000


def rebuild_corpus() -> None:
    """Rebuild the cached corpus the ``lm`` task reads (the CLI's ``--rebuild-corpus``: the
    way out of a corrupt cache, which the loader names)."""
    build_corpus(
        domains=list(DOMAINS),
        max_bytes_per_domain=MAX_BYTES_PER_DOMAIN,
        rebuild=True,
        progress=False,
    )


def load_lm_data(
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    domains: tuple[str, ...] = DOMAINS,
    max_bytes_per_domain: int = MAX_BYTES_PER_DOMAIN,
) -> LMData:
    """Byte-tokenized embedded corpus (CPython sources and docs by default), packed."""
    corpus = build_corpus(
        domains=list(domains), max_bytes_per_domain=max_bytes_per_domain, progress=False
    )
    tok = ByteTokenizer()
    splits = {
        split: tokenize_documents(
            [doc for d in corpus.domains for doc in corpus.documents(d, split)], tok
        )
        for split in ("train", "validation")
    }
    return LMData(
        train=PackedDataset(splits["train"], seq_len),
        val=PackedDataset(splits["validation"], seq_len),
        batch_size=batch_size,
        seed=seed,
    )


def lm_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    loss = model(x, targets=y).loss
    assert loss is not None
    return loss


@register_task("lm")
def lm_task(seed: int, options: dict[str, Any]) -> Task:
    """Options: ``size``, ``seq_len``, ``batch_size``, ``val_batches``, ``device``, ``model``
    (TransformerConfig overrides), ``max_bytes_per_domain``."""
    seq_len = int(options.get("seq_len", 64))
    batch_size = int(options.get("batch_size", 4))
    config = lm_config(options.get("size", "tiny"), max_seq_len=seq_len, **options.get("model", {}))
    torch.manual_seed(seed)
    device = torch.device(options.get("device", "cpu"))
    model = TransformerLM(config).to(device)
    data = load_lm_data(
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        max_bytes_per_domain=int(options.get("max_bytes_per_domain", MAX_BYTES_PER_DOMAIN)),
    )
    val = data.val_batches(int(options.get("val_batches", 8)))

    def to_device(batch: Any) -> Any:
        return tuple(t.to(device) for t in batch)

    class _DeviceData:
        def batch(self, worker: int, step: int) -> Any:
            return to_device(data.batch(worker, step))

    @torch.no_grad()
    def evaluate(m: nn.Module) -> float:
        return sum(float(lm_loss(m, to_device(b))) for b in val) / len(val)

    return Task(model, lm_loss, _DeviceData(), evaluate, tokens_per_step=batch_size * seq_len)
