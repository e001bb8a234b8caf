#!/usr/bin/env bash
# Pure-Python GPU comparison packages for an offline leased GPU machine: flash-linear-attention's
# kernels (fla-core) and einops, unpacked into build/gpu-deps (git-ignored). Pass that folder in
# the device run's `carry` list; ci/gpu-smoke.sh puts it on PYTHONPATH when it exists.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=build/gpu-deps
rm -rf "$dest" && mkdir -p "$dest/wheels"
pip download --no-deps -q -d "$dest/wheels" "fla-core==0.6.0" einops
for whl in "$dest"/wheels/*.whl; do python3 -m zipfile -e "$whl" "$dest"; done
rm -rf "$dest/wheels"
ls "$dest"
