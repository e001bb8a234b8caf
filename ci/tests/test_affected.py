"""ci/affected.py on a temporary git repository with a small dependency graph."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from stubs import REPO, Stub, git

AFFECTED = REPO / "ci" / "affected.py"

# core <- a <- b ; core <- c
STUBS = (
    Stub("shared/core"),
    Stub("packages/a", deps=["verger-core>=0.1,<0.2"]),
    Stub("packages/b", deps=["verger-a>=0.1", "torch>=2.4"]),
    Stub("packages/c", deps=["verger_core"]),
)


def run(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(AFFECTED), "--repo", str(root), *args],
        capture_output=True,
        text=True,
        check=False,
    )


def commit(root: Path, path: str, text: str = "change\n") -> None:
    target = root / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", f"touch {path}")


@pytest.fixture
def repo(make_workspace) -> Path:
    return make_workspace(*STUBS, git_init=True)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("packages/b/src/verger/b/x.py", ["b"]),
        ("packages/a/README.md", ["a", "b"]),  # a and its dependent b
        ("packages/c/tests/test_c.py", ["c"]),
        ("shared/core/src/verger/core/new.py", ["core", "a", "b", "c"]),
        ("noxfile.py", ["core", "a", "b", "c"]),
        ("ci/anything.sh", ["core", "a", "b", "c"]),
        (".github/workflows/ci.yml", ["core", "a", "b", "c"]),
        ("uv.lock", ["core", "a", "b", "c"]),
        ("docs/index.md", []),
        ("README.md", []),
        ("packages/ab/file.py", []),  # a prefix of a member name is not that member
    ],
)
def test_selection_follows_paths_and_dependents(repo: Path, path: str, expected: list[str]) -> None:
    commit(repo, path)
    proc = run(repo, "HEAD~1..HEAD", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == expected


def test_plain_output_and_reasons(repo: Path) -> None:
    commit(repo, "packages/a/src/verger/a/y.py")
    commit(repo, "packages/c/src/verger/c/y.py")
    proc = run(repo, "HEAD~2..HEAD", "-v")
    assert proc.stdout.split() == ["a", "b", "c"]
    assert "b: depends on an affected member (a)" in proc.stderr
    assert "a: changed: packages/a/src/verger/a/y.py" in proc.stderr


def test_three_dot_range_uses_the_merge_base(repo: Path) -> None:
    git(repo, "checkout", "-q", "-b", "feature")
    commit(repo, "packages/c/src/verger/c/f.py")
    git(repo, "checkout", "-q", "main")
    commit(repo, "packages/a/src/verger/a/m.py")  # on main only: not the feature's change
    proc = run(repo, "main...feature", "--json")
    assert json.loads(proc.stdout) == ["c"]
    two_dot = run(repo, "main..feature", "--json")  # the tree diff includes main's change
    assert json.loads(two_dot.stdout) == ["a", "b", "c"]


def test_moving_a_file_between_members_selects_both(repo: Path) -> None:
    git(repo, "mv", "packages/c/tests/test_c.py", "packages/b/tests/test_moved.py")
    git(repo, "commit", "-q", "-m", "move")
    assert json.loads(run(repo, "HEAD~1..HEAD", "--json").stdout) == ["b", "c"]


def test_empty_selection_prints_nothing(repo: Path) -> None:
    commit(repo, "docs/page.md")
    proc = run(repo, "HEAD~1..HEAD")
    assert proc.returncode == 0 and proc.stdout == ""
    assert run(repo, "HEAD~1..HEAD", "--json").stdout.strip() == "[]"


@pytest.mark.parametrize("bad", ["nope..HEAD", "HEAD..missing-branch", "--output=x", ""])
def test_bad_range_exits_2_and_explains(repo: Path, bad: str) -> None:
    proc = run(repo, "--", bad)  # "--": let an option-like range reach the range check
    assert proc.returncode == 2
    assert repr(bad) in proc.stderr
    assert "BASE...HEAD" in proc.stderr and "origin/main...HEAD" in proc.stderr
    assert proc.stdout == ""


def test_all_selects_every_member_and_a_missing_range_is_explained(repo: Path) -> None:
    assert json.loads(run(repo, "--all", "--json").stdout) == ["core", "a", "b", "c"]
    proc = run(repo)
    assert proc.returncode == 2 and "give a git range or --all" in proc.stderr
