# Sourced by the GPU scripts: the members' sources on PYTHONPATH, and the wheels that
# ci/gpu-deps.sh brought (build/gpu-deps/wheels, carried to the device) unpacked once into a
# temporary site folder, also on PYTHONPATH.
_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_srcs=$(ls -d "$_root"/shared/core/src "$_root"/packages/*/src | paste -sd:)
export PYTHONUNBUFFERED=1 PYTHONPATH=$_srcs${PYTHONPATH:+:$PYTHONPATH}
if [ -d "$_root/build/gpu-deps/wheels" ]; then
  _site=${TMPDIR:-/tmp}/verger-gpu-site
  if [ ! -f "$_site/.done" ]; then
    mkdir -p "$_site"
    for _whl in "$_root"/build/gpu-deps/wheels/*.whl; do python3 -m zipfile -e "$_whl" "$_site"; done
    touch "$_site/.done"
  fi
  export PYTHONPATH=$PYTHONPATH:$_site
fi
unset _root _srcs _site _whl
