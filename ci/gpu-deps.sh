#!/usr/bin/env bash
# Wheels for an offline leased GPU machine (its python3 is CPython 3.12 with torch, triton,
# numpy, scipy, scikit-learn/-image, timm, safetensors... preinstalled): what the members import
# that the machine lacks, at the lock's versions, plus the comparison anchors (fla-core).
# They stay wheels in build/gpu-deps/wheels (git-ignored, ~30 MB): name build/gpu-deps in the
# device run's `carry`; ci/gpu-env.sh (sourced by gpu-smoke.sh and gpu-check.sh --here)
# unpacks them there and puts them on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 ci/lock.py >/dev/null  # build/constraints.txt: the lock's pins
pinned() {  # NAME -> NAME==VERSION from the lock
  grep -i "^$1==" build/constraints.txt | sed 's/ *;.*//' | head -1
}
names=(
  open-clip-torch ftfy wcwidth mlxtend                               # maeclip
  soundfile cffi pycparser music21 chardet jsonpickle more-itertools webcolors  # music-guidance, core[data]
  trimesh                                                            # neural-parts
)
specs=("fla-core==0.6.0" "einops==0.8.2")  # fast-attention's GPU comparison
for name in "${names[@]}"; do
  spec=$(pinned "$name")
  [ -n "$spec" ] || { echo "gpu-deps: $name is not in uv.lock" >&2; exit 1; }
  specs+=("$spec")
done
dest=build/gpu-deps/wheels
rm -rf build/gpu-deps && mkdir -p "$dest"
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$dest" "${specs[@]}" 2> >(grep -v '^WARNING: Location' >&2)
ls "$dest"
du -sh build/gpu-deps
