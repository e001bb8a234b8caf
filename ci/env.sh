# Sourced by .ci/run and ci/gpu-check.sh: make uv and nox available and point uv at the wheel
# indexes this machine's pip is configured with (read now, never committed), so that no run
# downloads torch from PyPI when a local index has it. Safe to source more than once.

export PATH="$HOME/.local/bin:$HOME/.cargo/bin:$PATH"
export PYTHONUNBUFFERED=1

if ! command -v uv >/dev/null 2>&1; then
  echo "verger ci: installing uv" >&2
  if python3 -m pip --version >/dev/null 2>&1; then
    python3 -m pip install --quiet --disable-pip-version-check --user uv \
      || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages uv
  else
    curl -LsSf https://astral.sh/uv/install.sh | sh
  fi
fi

if [ -z "${UV_INDEX:-}" ]; then
  _verger_idx="${PIP_EXTRA_INDEX_URL:-}"
  if [ -z "$_verger_idx" ]; then
    _verger_idx=$( (python3 -m pip config get global.extra-index-url || pip config get global.extra-index-url) 2>/dev/null || true)
  fi
  if [ -n "$_verger_idx" ]; then
    export UV_INDEX="$_verger_idx"
    # the lock's pins decide versions, not which index lists a package first (noxfile.py)
    export UV_INDEX_STRATEGY="${UV_INDEX_STRATEGY:-unsafe-best-match}"
    echo "verger ci: uv uses pip's extra indexes first: $UV_INDEX" >&2
  fi
  unset _verger_idx
fi
