"""``python -m verger.core bench``: the transformer LM, the fused kernels, the data pipeline.

:func:`run_bench` (the command; :class:`BenchSettings`) records in ``metrics.json``:

- ``train_step_speedup_fused``: tokens/s of a full training step (forward, backward, AdamW)
  of a ~20M-parameter ``TransformerLM`` with ``fused=True`` over the same model with
  ``fused=False`` (plain ``nn.RMSNorm``, ``F.silu(g) * u``, ``F.cross_entropy`` on full
  logits), timed interleaved in one run; plus ``train_tokens_per_s_fused|plain``,
  ``train_gflops_per_s_fused`` (analytic FLOPs) and ``model_parameters``.
- ``ce_peak_memory_ratio``: peak memory of ``linear_cross_entropy`` (forward + backward)
  over ``F.cross_entropy(x @ W.T)`` at vocab 50257 (target <= 0.5), with both peaks in MB and
  ``ce_speedup_fused`` (time ratio).
- ``<op>_speedup_vs_reference`` for the dispatch path of each op (fwd + bwd) against its
  pure-torch reference; on CUDA also ``<op>_speedup_vs_compile`` against
  ``torch.compile(reference)``.
- ``torch_num_threads``: the intra-op threads used (CPU timings depend on it).
- ``data_*``: tokenizer and sampler throughput on stdlib text.

The measuring functions return plain dicts so they can be used without a Report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from verger.core.bench import Report, compare, measure_peak_memory, new_figure
from verger.core.kernels import (
    apply_rotary_emb,
    linear_cross_entropy,
    linear_cross_entropy_reference,
    rms_norm,
    rms_norm_reference,
    rotary_reference,
    rotary_tables,
    swiglu,
    swiglu_reference,
)
from verger.core.nn import TransformerConfig, TransformerLM
from verger.core.progress import progress
from verger.core.runs import Run
from verger.core.settings import Settings, option
from verger.core.testing import limit_torch_threads

CE_VOCAB = 50257


def bench_config(**overrides: Any) -> TransformerConfig:
    """The ~20M-parameter benchmark model (d 384, 8 layers, vocab 16384, context 256)."""
    fields: dict[str, Any] = dict(
        vocab_size=16384, d_model=384, n_layers=8, n_heads=6, max_seq_len=256
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def measure_train_step(
    *, batch: int, seq_len: int, repeats: int, device: torch.device, seed: int = 0
) -> dict[str, float]:
    """Tokens/s of a training step, fused vs plain, same weights and data, interleaved."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    fused = TransformerLM(bench_config(fused=True)).to(device)
    plain = TransformerLM(bench_config(fused=False)).to(device)
    plain.load_state_dict(fused.state_dict())
    data = torch.randint(0, fused.config.vocab_size, (batch, seq_len + 1), generator=gen)
    ids, targets = data[:, :-1].to(device), data[:, 1:].to(device)

    def step_fn(model: TransformerLM) -> Callable[[], None]:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step() -> None:
            loss = model(ids, targets).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    timings = compare({"fused": step_fn(fused), "plain": step_fn(plain)}, warmup=1, repeats=repeats)
    tokens = batch * seq_len
    tps = {name: tokens / t.median_s for name, t in timings.items()}
    flops = fused.flops_per_token(seq_len)
    return {
        "model_parameters": fused.num_parameters(),
        "train_tokens_per_s_fused": tps["fused"],
        "train_tokens_per_s_plain": tps["plain"],
        "train_step_speedup_fused": tps["fused"] / tps["plain"],
        "train_gflops_per_s_fused": tps["fused"] * flops / 1e9,
    }


def measure_cross_entropy(
    *, tokens: int, dim: int, device: torch.device, repeats: int, seed: int = 0
) -> dict[str, float]:
    """Peak memory and time of fused vs naive linear + cross-entropy at vocab 50257."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=gen).to(device).requires_grad_(True)
    w = (torch.randn(CE_VOCAB, dim, generator=gen) * 0.02).to(device).requires_grad_(True)
    t = torch.randint(0, CE_VOCAB, (tokens,), generator=gen).to(device)

    def naive() -> None:
        x.grad = w.grad = None
        F.cross_entropy(x @ w.T, t).backward()

    def fused() -> None:
        x.grad = w.grad = None
        linear_cross_entropy(x, w, t).backward()

    naive()  # warm up allocators/kernels outside the measurement
    peak_naive = measure_peak_memory(naive, device=device)
    peak_fused = measure_peak_memory(fused, device=device)
    timings = compare({"fused": fused, "naive": naive}, warmup=1, repeats=repeats)
    return {
        "ce_peak_memory_naive_mb": peak_naive / 2**20,
        "ce_peak_memory_fused_mb": peak_fused / 2**20,
        "ce_peak_memory_ratio": peak_fused / peak_naive,
        "ce_speedup_fused": timings["naive"].median_s / timings["fused"].median_s,
    }


@dataclass(kw_only=True)
class BenchSettings(Settings):
    """Sizes of ``python -m verger.core bench`` (``--quick``: under 2 minutes on 2 CPU cores)."""

    batch: int = option(8, quick=2, at_least=1, help="training-step batch (sequences)")
    seq_len: int = option(256, quick=128, at_least=8, help="training-step sequence length")
    ce_tokens: int = option(4096, quick=512, at_least=1, help="cross-entropy tokens")
    op_rows: int = option(8192, quick=1024, at_least=16, help="rows of the op benchmarks")
    op_dim: int = option(1024, quick=512, at_least=16, help="hidden size of the op benchmarks")
    op_heads: int = option(16, quick=8, at_least=1, help="heads of the rotary benchmark")
    repeats: int = option(7, quick=3, at_least=1, help="timed repeats per candidate")
    data_docs: int = option(100, quick=20, at_least=1, help="documents tokenized per repeat")
    timing_threads: int | None = option(
        None,
        quick=1,
        at_least=1,
        identity=False,
        help="CPU intra-op threads while timing (none: --threads); one thread keeps a loaded "
        "shared machine's timings stable",
    )


def _op_cases(device: torch.device, s: BenchSettings) -> dict[str, tuple[Callable, Callable, list]]:
    """For each op: (dispatch fn, reference fn, inputs) at an LM-like size."""
    rows, d, heads = s.op_rows, s.op_dim, s.op_heads
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    cos, sin = rotary_tables(rows // 4, d // heads, device=device)
    ce_rows, ce_dim = s.ce_tokens, 256
    ce_t = torch.randint(0, CE_VOCAB, (ce_rows,), generator=gen).to(device)
    return {
        "rms_norm": (
            lambda x, w: rms_norm(x, w, 1e-5),
            lambda x, w: rms_norm_reference(x, w, 1e-5),
            [rnd(rows, d), torch.ones(d, device=device)],
        ),
        "rotary": (
            lambda x: apply_rotary_emb(x, cos, sin),
            lambda x: rotary_reference(x, cos, sin),
            [rnd(4, rows // 4, heads, d // heads)],
        ),
        "swiglu": (swiglu, swiglu_reference, [rnd(rows, 4 * d), rnd(rows, 4 * d)]),
        "linear_cross_entropy": (
            lambda x, w: linear_cross_entropy(x, w, ce_t),
            lambda x, w: linear_cross_entropy_reference(x, w, ce_t),
            [rnd(ce_rows, ce_dim), rnd(CE_VOCAB, ce_dim) * 0.02],
        ),
    }


def measure_ops(*, device: torch.device, settings: BenchSettings) -> dict[str, float]:
    """Forward + backward of each op's dispatch path vs its reference (and torch.compile of
    the reference on CUDA, where the Triton kernels run)."""
    out: dict[str, float] = {}
    cases = _op_cases(device, settings)
    for name, (fn, ref, inputs) in progress(cases.items(), desc="ops", total=len(cases)):
        leaves = [t.requires_grad_(True) for t in inputs]

        def fwd_bwd(f: Callable, leaves: list[torch.Tensor] = leaves) -> Callable[[], None]:
            def call() -> None:
                for leaf in leaves:
                    leaf.grad = None
                y = f(*leaves)
                (y.sum() if y.ndim else y).backward()

            return call

        candidates = {"dispatch": fwd_bwd(fn), "reference": fwd_bwd(ref)}
        if device.type == "cuda":
            candidates["compile"] = fwd_bwd(torch.compile(ref, dynamic=False))
        timings = compare(candidates, warmup=2, repeats=settings.repeats)
        base = timings["dispatch"].median_s
        out[f"{name}_speedup_vs_reference"] = timings["reference"].median_s / base
        if "compile" in timings:
            out[f"{name}_speedup_vs_compile"] = timings["compile"].median_s / base
    return out


def measure_data_pipeline(settings: BenchSettings) -> dict[str, float]:
    """Tokenizer and sampler throughput on stdlib text (no downloads)."""
    from verger.core.data import (
        ByteTokenizer,
        DomainSampler,
        PackedDataset,
        build_corpus,
        train_bpe,
    )

    corpus = build_corpus(domains=["docs"], progress=False)
    docs = corpus.documents("docs")[: settings.data_docs]
    text_mb = sum(len(d.encode()) for d in docs) / 1e6
    out: dict[str, float] = {}
    byte = ByteTokenizer()
    fns = {"byte": lambda: [byte.encode(d) for d in docs]}
    try:
        bpe = train_bpe(docs, vocab_size=1024)
        fns["bpe"] = lambda: bpe.encode_batch(docs)
    except ImportError:
        pass
    t = compare(fns, warmup=1, repeats=settings.repeats)
    for name, timing in t.items():
        out[f"data_{name}_encode_mb_per_s"] = text_mb / timing.median_s
    ds = {f"d{i}": PackedDataset(torch.randint(1000, (200_000,)), 128) for i in range(8)}
    sampler = DomainSampler(ds, torch.ones(8), batch_size=32)
    t = compare({"sample": sampler.sample}, warmup=2, repeats=settings.repeats * 3, inner=10)
    out["data_sampler_batches_per_s"] = 1.0 / t["sample"].median_s
    return out


def _measure_all(dev: torch.device, s: BenchSettings) -> dict[str, float]:
    metrics: dict[str, float] = {}
    stages = ["train step", "cross-entropy", "ops", "data"]
    for stage in progress(stages, desc="core bench"):
        if stage == "train step":
            metrics |= measure_train_step(
                batch=s.batch, seq_len=s.seq_len, repeats=s.repeats, device=dev
            )
        elif stage == "cross-entropy":
            metrics |= measure_cross_entropy(
                tokens=s.ce_tokens, dim=256, device=dev, repeats=s.repeats
            )
        elif stage == "ops":
            metrics |= measure_ops(device=dev, settings=s)
        else:
            metrics |= measure_data_pipeline(s)
    return metrics


def run_bench(settings: BenchSettings, run: Run) -> Report:
    """Every measurement on ``run.device``, with tables and plots, into the run folder."""
    dev = run.device
    report = run.report("verger-core bench")
    threads = torch.get_num_threads()
    if dev.type == "cpu" and settings.timing_threads is not None:
        threads = settings.timing_threads
    with limit_torch_threads(threads):
        metrics = _measure_all(dev, settings)
    metrics["torch_num_threads"] = threads
    report.metrics_from(metrics)
    report.text(
        "### Transformer LM and fused kernels\n\n"
        f"Device: {dev}. Training step of a {metrics['model_parameters'] / 1e6:.1f}M-parameter "
        "TransformerLM (fused kernels vs plain torch modules, same weights and batch, "
        "interleaved timing). Cross-entropy peak memory at vocab 50257 counts tensor storage "
        "allocated during forward + backward. "
        + (
            "Triton kernels ran on CUDA."
            if dev.type == "cuda"
            else "No GPU: the CPU dispatch "
            "paths were measured; the Triton `*_speedup_vs_compile` figures need CUDA."
        )
    )
    data = {k: v for k, v in metrics.items() if k.startswith("data_")}
    report.table("Data pipeline throughput", [{"metric": k, "value": v} for k, v in data.items()])
    fig, ax = new_figure(width=10.0, height=3.5)
    ax.remove()
    ax1, ax2 = fig.subplots(1, 2)
    ax1.bar(
        ["plain", "fused"],
        [metrics["train_tokens_per_s_plain"], metrics["train_tokens_per_s_fused"]],
        color=["tab:gray", "tab:blue"],
    )
    ax1.set_ylabel("tokens / s")
    ax1.set_title(f"training step, {metrics['model_parameters'] / 1e6:.0f}M params ({dev.type})")
    ax2.bar(
        ["F.cross_entropy(x @ W.T)", "linear_cross_entropy"],
        [metrics["ce_peak_memory_naive_mb"], metrics["ce_peak_memory_fused_mb"]],
        color=["tab:gray", "tab:blue"],
    )
    ax2.set_ylabel("peak MB (fwd + bwd)")
    ax2.set_title(f"cross-entropy, vocab {CE_VOCAB}")
    fig.tight_layout()
    report.plot("models_bench", fig)
    return report
