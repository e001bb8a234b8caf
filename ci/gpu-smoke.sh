#!/usr/bin/env bash
# A short GPU check for a leased machine with a preinstalled torch/triton/pytest (no installs),
# most important first (the open question is the fast-attention GPU speed): the fast-attention
# gpu tests, its Triton-vs-SDPA/fla sweep (plus CUDA-graph replays and the sequential
# schedule), the causal clustered LM form, fused/unfused/sequential timings (with the host time
# to issue each step) and kernel tables, then core's gpu tests and kernel/LM benchmark
# (SKIP_CORE=1 leaves those out). Only logs go to ${OUT:-build/gpu-smoke} (at most 8 files
# come back from a device call); every figure is printed into them.
# Worst case 670 s (SKIP_CORE=1: 560 s; one device call runs at most 600 s). Seen on an H200:
# 80 s of tests (before the fused and sequential cases were added), then a cold sweep over
# 120 s (fla autotunes at every sequence length). For the full check through nox, use
# ci/gpu-check.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-build/gpu-smoke}
mkdir -p "$out"
# Members from source; flash-linear-attention for the comparison: `bash ci/gpu-deps.sh` here,
# then carry build/gpu-deps.
source ci/gpu-env.sh
py=${PYTHON:-python3}
pytest_gpu() {
  "$py" -m pytest "$@" -m gpu -q -p no:cacheprovider -o addopts="--import-mode=importlib"
}
nvidia-smi -L
"$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

timeout 180 bash -c "$(declare -f pytest_gpu); py=$py; pytest_gpu packages/fast-attention/tests --durations=5" \
  2>&1 | tee "$out/fa_tests_gpu.log" | tail -30
fa_tests_rc=${PIPESTATUS[0]}

reports=$(mktemp -d)
# The package's own GPU bench: Triton vs SDPA (flash) and fla, fp16 fwd+bwd, synchronized and
# pipelined, plus the causal clustered LM form; metrics.json and the missed targets in the log.
timeout 240 "$py" -m verger.fast_attention bench --device cuda --no-accuracy --overwrite \
  --out "$reports/fast-attention" 2>&1 | tee "$out/fa_bench.log" | tail -20
fa_rc=${PIPESTATUS[0]}
[ -f "$reports/fast-attention/metrics.json" ] && tee -a "$out/fa_bench.log" <"$reports/fast-attention/metrics.json"

# The encoder form's k-means on the GPU: the Triton loop vs the torch loop.
timeout 80 "$py" - <<'PY' 2>&1 | tee "$out/fa_clustered.log" | tail -12
import torch
# the encoder form's k-means (8 groups, 100 clusters, 63 bits, 10 iterations): the Triton
# loop (a launch per sweep, no sync) vs the torch loop on the GPU
from verger.core.bench import compare
from verger.fast_attention.ops.clustering import hamming_kmeans, hash_codes
for n in (8192, 32768):
    codes = hash_codes(torch.randn(8, n, 64, device="cuda"), 63)
    runs = {b: (lambda b=b: hamming_kmeans(codes, 100, 10, backend=b)) for b in ("triton", "torch")}
    same = all(torch.equal(x, y) for x, y in zip(runs["triton"](), runs["torch"]()))
    med = {b: round(t.median_s * 1e3, 3) for b, t in compare(runs, warmup=2, repeats=10).items()}
    print(f"k-means n={n} ms: {med}, identical: {same}", flush=True)
PY

# The fused feature map vs features formed outside the kernels (the same Triton kernels) and
# vs the sequential schedule, and where the time goes in one fp16 fwd+bwd (kernel tables).
timeout 60 "$py" - <<'PY' 2>&1 | tee "$out/fa_profile.log" | tail -40
import time
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from verger.core.bench import compare
from verger.fast_attention import linear_attention
from verger.fast_attention.ops.causal_linear import causal_linear, causal_linear_fused
for n in (8192, 32768):
    q, k, v = (torch.randn(1, 8, n, 64, device="cuda", dtype=torch.half, requires_grad=True) for _ in range(3))
    fused = lambda: linear_attention(q, k, v, causal=True).sum().backward()
    apart = lambda: causal_linear(F.elu(q) + 1, F.elu(k) + 1, v).sum().backward()
    seq = lambda: causal_linear_fused(q, k, v, schedule="sequential").sum().backward()
    steps = {"fused": fused, "apart": apart, "sequential": seq}
    med = {name: t.median_s * 1e3 for name, t in compare(steps, warmup=2, repeats=10).items()}
    print(f"n={n} fp16 fwd+bwd ms: {med}; fused speedup {med['apart'] / med['fused']:.2f}", flush=True)
    enqueue = {}  # host time to issue a step (GPU idle first): host-bound when ~ the median
    for name, step in steps.items():
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            step()
        enqueue[name] = round((time.perf_counter() - t) / 10 * 1e3, 3)
        torch.cuda.synchronize()
    print(f"n={n} host ms to issue one step: {enqueue}", flush=True)
    for name in ("fused", "sequential"):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            steps[name]()
            torch.cuda.synchronize()
        print(name, prof.key_averages().table(sort_by="cuda_time_total", row_limit=8))
PY

# Host time per Triton launch (through kernel[grid] and straight through the compiled
# launcher) against a torch op, and a cProfile of the host-bound fused step at 1k tokens.
timeout 90 "$py" ci/gpu_launch_cost.py 2>&1 | tee "$out/fa_launch.log" | head -20

if [ -n "${SKIP_CORE:-}" ]; then
  echo "gpu-smoke: fa tests rc=$fa_tests_rc fa bench rc=$fa_rc (core skipped)"
  exit 0
fi
timeout 60 bash -c "$(declare -f pytest_gpu); py=$py; pytest_gpu shared/core/tests" \
  2>&1 | tee "$out/core_tests_gpu.log" | tail -10
core_tests_rc=${PIPESTATUS[0]}
timeout 50 "$py" -m verger.core bench --quick --out "$reports/core" >"$out/core_bench.log" 2>&1
core_rc=$?
tail -3 "$out/core_bench.log"
[ -f "$reports/core/metrics.json" ] && tee -a "$out/core_bench.log" <"$reports/core/metrics.json"
echo "gpu-smoke: fa tests rc=$fa_tests_rc fa bench rc=$fa_rc core tests rc=$core_tests_rc core bench rc=$core_rc"
