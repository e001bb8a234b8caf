"""The versions the nox sessions install: ``uv.lock`` exported as a pip constraints file.

Every session installs its member with ``-c build/constraints.txt``, so it gets exactly the
versions the lock pins (torch and Triton included) whatever the indexes serve today. The file
is made with ``uv export --frozen`` (the lock as it is, no resolution, no network) and
re-made when ``uv.lock`` changes; workspace members are left out, since the sessions install
them from their folders. Stdlib only: the noxfile and the tooling tests import it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

EXPORT_FLAGS = (
    "export",
    "--frozen",
    "--no-hashes",
    "--no-emit-workspace",
    "--all-packages",
    "--all-extras",
    "--all-groups",
    "--no-header",
    "--no-annotate",
    "--format",
    "requirements.txt",
)
_STAMP = "# verger constraints from uv.lock sha256="


class LockError(RuntimeError):
    """uv.lock is missing or cannot be exported; the message says what to do."""


def uv_command() -> list[str]:
    """How to run uv here: the ``uv`` on PATH, else the ``uv`` Python package."""
    exe = shutil.which("uv")
    if exe:
        return [exe]
    try:
        import uv  # type: ignore[import-not-found]

        return [uv.find_uv_bin()]
    except ImportError as exc:
        raise LockError("uv is needed to read uv.lock: install it (pip install uv)") from exc


def lock_digest(root: Path) -> str:
    lock = root / "uv.lock"
    if not lock.is_file():
        raise LockError(
            f"{lock} is missing: the sessions install the versions it pins; create it with "
            "`env -u UV_INDEX uv lock` (see docs/contributing.md, 'The lock file')"
        )
    return hashlib.sha256(lock.read_bytes()).hexdigest()


def export_constraints(root: Path, out: Path) -> Path:
    """Write the lock's pins as a constraints file at ``out`` (kept while uv.lock is unchanged).

    Raises :class:`LockError` when the lock is missing or uv cannot export it (e.g. a
    pyproject changed and the lock was not regenerated: uv names the difference).
    """
    digest = lock_digest(root)
    if out.is_file() and out.read_text(encoding="utf-8").startswith(_STAMP + digest):
        return out
    proc = subprocess.run(
        [*uv_command(), *EXPORT_FLAGS],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"},
    )
    if proc.returncode != 0:
        raise LockError(f"`uv export` of {root / 'uv.lock'} failed:\n{proc.stderr.strip()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{_STAMP}{digest}\n{proc.stdout}", encoding="utf-8")
    os.replace(tmp, out)  # concurrent nox runs never read a half-written file
    return out


def pinned_versions(constraints: Path) -> dict[str, str]:
    """``{name: version}`` of the unconditional ``name==version`` lines of a constraints file."""
    pins: dict[str, str] = {}
    for line in constraints.read_text(encoding="utf-8").splitlines():
        spec = line.split("#", 1)[0].strip()
        if "==" in spec and ";" not in spec:
            name, version = spec.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    return pins


if __name__ == "__main__":  # python ci/lock.py: print the exported constraints' path
    here = Path(__file__).resolve().parent.parent
    try:
        print(export_constraints(here, here / "build" / "constraints.txt"))
    except LockError as exc:
        sys.exit(str(exc))
