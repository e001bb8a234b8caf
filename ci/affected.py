#!/usr/bin/env python3
"""Print the workspace members a git range touches, plus every member that depends on them.

    python ci/affected.py origin/main...HEAD          # one short name per line
    python ci/affected.py origin/main...HEAD --json   # ["core", "fast-attention"] for a CI matrix

A change under a member's folder selects that member and its dependents (read from the
members' pyproject dependencies). A change to shared infrastructure (``shared/``, the
noxfile, the root pyproject, ``uv.lock``, ``ci/``, ``.ci/``, ``.github/``) selects every
member. Docs and README edits select none. Exit status: 0 on success, 2 on a bad range.
Stdlib only, so CI can run it before anything is installed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workspace import Member, dependents, discover_members

# Paths whose change may alter how every member is built or tested.
GLOBAL_FILES = frozenset({"noxfile.py", "pyproject.toml", "uv.lock"})
GLOBAL_DIRS = ("shared/", "ci/", ".ci/", ".github/")

RANGE_HELP = (
    "write it as BASE..HEAD (commits in HEAD not in BASE), BASE...HEAD (changes since their "
    "merge base, what a pull request shows, e.g. origin/main...HEAD) or a single REV (REV "
    "against the working tree), with revisions that exist in this clone (git fetch them first)"
)


class BadRange(ValueError):
    """The git range could not be resolved in the repository."""


def changed_files(repo: Path, git_range: str) -> list[str]:
    """Paths (posix, relative to the repo root) that differ across ``git_range``."""
    if not git_range.strip() or git_range.startswith("-"):
        raise BadRange(f"bad git range {git_range!r}: {RANGE_HELP}")
    proc = subprocess.run(
        ["git", "-C", str(repo), "diff", "--name-only", "--no-renames", "-z", git_range, "--"],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["git diff failed"])[0]
        raise BadRange(f"bad git range {git_range!r} ({reason}): {RANGE_HELP}")
    return [p for p in proc.stdout.split("\0") if p]


def is_global(path: str) -> bool:
    """Whether a change to ``path`` can affect every member."""
    return path in GLOBAL_FILES or path.startswith(GLOBAL_DIRS)


def affected(paths: list[str], members: list[Member]) -> tuple[list[Member], dict[str, str]]:
    """The affected members (workspace order) and, per member, the first reason it was chosen."""
    reasons: dict[str, str] = {}
    for path in paths:
        if is_global(path):
            for m in members:
                reasons.setdefault(m.short, f"shared infrastructure changed: {path}")
            continue
        for m in members:
            if path.startswith(m.rel + "/"):
                reasons.setdefault(m.short, f"changed: {path}")
    touched = [m for m in members if m.short in reasons]
    chosen = dependents(touched, members)
    for m in chosen:
        if m.short not in reasons:
            deps = ", ".join(d.removeprefix("verger-") for d in m.verger_deps)
            reasons[m.short] = f"depends on an affected member ({deps})"
    return chosen, reasons


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "range", nargs="?", help="git range, e.g. origin/main...HEAD or HEAD~1..HEAD"
    )
    parser.add_argument("--all", action="store_true", help="every member, whatever the range")
    parser.add_argument("--json", action="store_true", help="print a JSON list of short names")
    parser.add_argument(
        "--repo", type=Path, default=Path(__file__).resolve().parent.parent, help="repo root"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="explain each choice")
    args = parser.parse_args(argv)

    if args.range is None and not args.all:
        parser.error(f"give a git range or --all; {RANGE_HELP}")
    try:
        paths = ["noxfile.py"] if args.all else changed_files(args.repo, args.range)
    except BadRange as exc:
        print(f"affected.py: {exc}", file=sys.stderr)
        return 2
    chosen, reasons = affected(paths, discover_members(args.repo))
    if args.verbose:
        for m in chosen:
            print(f"{m.short}: {reasons[m.short]}", file=sys.stderr)
    names = [m.short for m in chosen]
    if args.json:
        print(json.dumps(names))
    elif names:
        print("\n".join(names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
