#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU: every member's GPU tests (@pytest.mark.gpu),
# then every member's `bench` (which takes its Triton/CUDA paths when CUDA is visible), then the
# combined report, build/report.md.
#
#   bash ci/gpu-check.sh                   # through nox: fresh uv environments per member
#   bash ci/gpu-check.sh --here            # in the current Python environment, no installs
#                                          # (offline GPU hosts with torch/triton/pytest there)
#   VERGER_PACKAGES=core,fast-attention bash ci/gpu-check.sh
#   VERGER_QUICK=0 bash ci/gpu-check.sh    # full-size benchmarks (default: --quick)
#
# A missing GPU is an error here, not a skip: exit 2 before anything runs.
set -uo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu-check: no CUDA GPU visible (nvidia-smi missing or failing); run this on a GPU machine" >&2
  exit 2
fi
nvidia-smi -L
start=$(date +%s)

if [ "${1:-}" = "--here" ]; then
  python=${PYTHON:-python3}
  # shellcheck source=gpu-env.sh
  source ci/gpu-env.sh  # the wheels ci/gpu-deps.sh brought (carry build/gpu-deps)
  export VERGER_REQUIRE_GPU=1
  "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: torch sees no CUDA device')" || exit 2
  full=$([ "${VERGER_QUICK:-1}" = "0" ] && echo --full || true)
  "$python" ci/here.py tests_gpu; tests_rc=$?
  "$python" ci/here.py bench $full; bench_rc=$?
  "$python" ci/here.py report
  if [ -n "${OUT:-}" ]; then  # a leased machine returns only $OUT: the report and metrics in one file
    tar czf "$OUT/gpu-check.tgz" build/report.md build/bench build/test-results 2>/dev/null
  fi
else
  # shellcheck source=env.sh
  source ci/env.sh
  export VERGER_REQUIRE_GPU=1  # tests_gpu fails, not skips, if torch cannot see the GPU
  uvx nox -s tests_gpu; tests_rc=$?
  uvx nox -s bench; bench_rc=$?  # bench notifies report
fi

echo "=== gpu-check: tests_gpu $([ $tests_rc -eq 0 ] && echo passed || echo FAILED)," \
  "bench $([ $bench_rc -eq 0 ] && echo passed || echo FAILED) in $(( $(date +%s) - start ))s;" \
  "figures in build/bench/*/metrics.json and build/report.md"
[ $tests_rc -eq 0 ] && [ $bench_rc -eq 0 ]
