"""One worker's inner step at ~125M parameters on a GPU: DiLoCo vs 1/4-MLP partial updates.

    PYTHONPATH=shared/core/src:packages/sparse-diloco/src python packages/sparse-diloco/benchmarks/gpu_step.py OUT_DIR

Writes OUT_DIR/metrics.json with the same ratio names as ``bench`` (FLOP counter, CUDA
allocator peak of a fresh worker's two inner steps, interleaved step-time medians).
Random tokens: this measures cost, not loss.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from verger.core.bench import compare, count_flops, measure_peak_memory
from verger.core.nn import TransformerLM
from verger.sparse_diloco import DiLoCo, DiLoCoConfig, SubsetPlan
from verger.sparse_diloco.lm import lm_config, lm_loss


class RandomTokens:
    def __init__(self, batch: int, seq: int, vocab: int, device: torch.device) -> None:
        self.shape, self.vocab, self.device = (batch, seq), vocab, device

    def batch(self, worker: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(worker * 100_003 + step)
        x = torch.randint(0, self.vocab, (self.shape[0], self.shape[1] + 1), generator=gen)
        x = x.to(self.device)
        return x[:, :-1], x[:, 1:]


def main(out: Path, *, fused: bool = True, batch: int = 8, seq: int = 1024) -> dict[str, float]:
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    model = TransformerLM(lm_config("125m", max_seq_len=seq, fused=fused)).to(device)
    data = RandomTokens(batch, seq, model.config.vocab_size, device)
    config = DiLoCoConfig(num_workers=4, inner_steps=10, inner_lr=1e-3)
    plans = {"diloco": SubsetPlan.full(model, 4), "partial": SubsetPlan.mlp_slices(model, 4)}
    engines = {}
    metrics: dict[str, float] = {"params": model.num_parameters(), "fused": fused}
    for name, plan in plans.items():
        # one local worker on this GPU: a transport-free engine of W workers would copy 4x
        engine = DiLoCo(model, plan, config, loss_fn=lm_loss, data=data, transport=_One(4))
        engines[name] = engine
        w = engine.workers[0]

        def fwd_bwd(w=w) -> None:
            lm_loss(w.model, data.batch(0, 0)).backward()

        metrics[f"flops_{name}"] = count_flops(fwd_bwd)
        w.optimizer.zero_grad(set_to_none=True)

        def two_steps(engine=engine) -> None:
            fresh = engine.make_worker(1)
            for _ in range(2):
                engine.inner_step(fresh)
            del fresh

        torch.cuda.empty_cache()
        metrics[f"peak_bytes_{name}"] = measure_peak_memory(two_steps, device=device)
    t = compare(
        {k: (lambda e=e: e.inner_step(e.workers[0])) for k, e in engines.items()},
        warmup=3,
        repeats=15,
    )
    metrics["step_ms_diloco"] = t["diloco"].median_s * 1e3
    metrics["step_ms_partial"] = t["partial"].median_s * 1e3
    metrics["flops_ratio_vs_diloco"] = metrics["flops_partial"] / metrics["flops_diloco"]
    metrics["peak_memory_ratio_vs_diloco"] = (
        metrics["peak_bytes_partial"] / metrics["peak_bytes_diloco"]
    )
    metrics["step_time_ratio_vs_diloco"] = metrics["step_ms_partial"] / metrics["step_ms_diloco"]
    metrics["device"] = torch.cuda.get_device_name()
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


class _One:
    """A transport holding worker 0 only (the step benchmark never syncs)."""

    def __init__(self, num_workers: int) -> None:
        self.num_workers = num_workers

    def local_workers(self) -> list[int]:
        return [0]

    def exchange(self, payloads, sizes):  # pragma: no cover - never called here
        raise RuntimeError("no sync in the step benchmark")


if __name__ == "__main__":
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "build/bench/sparse-diloco-gpu")
    try:
        print(json.dumps(main(out_dir), indent=2))
    except Exception as exc:  # the fused Triton kernels may not match this GPU's Triton
        print(f"fused=True failed ({type(exc).__name__}: {exc}); retrying with fused=False")
        print(json.dumps(main(out_dir, fused=False), indent=2))
