#!/usr/bin/env bash
# A short GPU check for a leased machine with a preinstalled torch/triton/pytest (no installs),
# most important first (the open question is the fast-attention GPU speed): the fast-attention
# gpu tests, its Triton-vs-SDPA/fla sweep, a profiler kernel table, then core's gpu tests and
# kernel/LM benchmark. Output (logs, metrics.json) goes to ${OUT:-build/gpu-smoke}.
# Worst case 580 s (one device call may run 600 s). For the full check through nox, use
# ci/gpu-check.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-build/gpu-smoke}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=shared/core/src:packages/fast-attention/src${PYTHONPATH:+:$PYTHONPATH}
# flash-linear-attention for the comparison: `bash ci/gpu-deps.sh` here, then carry build/gpu-deps.
[ -d build/gpu-deps ] && export PYTHONPATH=$PYTHONPATH:$PWD/build/gpu-deps
py=${PYTHON:-python3}
pytest_gpu() {
  "$py" -m pytest "$@" -m gpu -q -p no:cacheprovider -o addopts="--import-mode=importlib"
}
nvidia-smi -L
"$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

timeout 200 bash -c "$(declare -f pytest_gpu); py=$py; pytest_gpu packages/fast-attention/tests" \
  2>&1 | tee "$out/fa_tests_gpu.log" | tail -30
fa_tests_rc=${PIPESTATUS[0]}

timeout 140 "$py" - "$out/fast-attention" <<'PY' 2>&1 | tee "$out/fa_bench.log" | tail -20
import sys
from verger.core.bench import Report
from verger.fast_attention.bench import bench_gpu, check_targets
report = Report(sys.argv[1], title="fast-attention GPU sweep (fp16 fwd+bwd)")
bench_gpu(report, [1024, 8192, 32768], 5)
report.write()
import json, pathlib
metrics = json.loads((pathlib.Path(sys.argv[1]) / "metrics.json").read_text())
print(json.dumps(metrics, indent=1))
print("missed:", check_targets(metrics) or "none")
PY
fa_rc=${PIPESTATUS[0]}

# Where the time goes in one fp16 fwd+bwd at 32k tokens (kernel table, CUDA time).
timeout 60 "$py" - <<'PY' 2>&1 | tee "$out/fa_profile.log" | tail -25
import torch
from torch.profiler import ProfilerActivity, profile
from verger.fast_attention import linear_attention
q, k, v = (torch.randn(1, 8, 32768, 64, device="cuda", dtype=torch.half, requires_grad=True) for _ in range(3))
step = lambda: linear_attention(q, k, v, causal=True).sum().backward()
for _ in range(3):
    step()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20))
PY

timeout 90 bash -c "$(declare -f pytest_gpu); py=$py; pytest_gpu shared/core/tests" \
  2>&1 | tee "$out/core_tests_gpu.log" | tail -10
core_tests_rc=${PIPESTATUS[0]}
timeout 90 "$py" -m verger.core bench --quick --out "$out/core" >"$out/core_bench.log" 2>&1
core_rc=$?
tail -3 "$out/core_bench.log"
[ -f "$out/core/metrics.json" ] && cat "$out/core/metrics.json"
echo "gpu-smoke: fa tests rc=$fa_tests_rc fa bench rc=$fa_rc core tests rc=$core_tests_rc core bench rc=$core_rc"
