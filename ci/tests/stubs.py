"""Helpers for the tooling tests: throw-away workspaces made of stub members.

A stub member has no third-party dependencies, so nox sessions over it take seconds; its
``__main__`` (when asked for) writes a known ``metrics.json`` and a tiny PNG.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# A valid 1x1 PNG, enough for the report and the docs to copy and link.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)

MAIN = """\
import json, sys
from pathlib import Path

args = sys.argv[1:]
out = Path(args[args.index("--out") + 1])
out.mkdir(parents=True, exist_ok=True)
(out / "metrics.json").write_text(json.dumps({"command": args[0], "quick": "--quick" in args, "ratio": 0.5}))
(out / "report.md").write_text("# stub report\\n")
(out / "curve.png").write_bytes(bytes.fromhex("%s"))
"""


@dataclass
class Stub:
    """What to put in one stub member."""

    rel: str  # "shared/core", "packages/a"
    deps: list[str] = field(default_factory=list)  # requirement strings
    main: bool = False  # ship a __main__ that writes metrics.json
    tests: str | None = "def test_one():\n    assert 1 + 1 == 2\n"  # None: no tests/ folder
    readme: str | None = None
    changelog: str | None = "# Changelog\n\n## [0.1.0] - 2026-11-27\n\n### Added\n- everything\n"
    version: str = "0.1.0"

    @property
    def short(self) -> str:
        return self.rel.rsplit("/", 1)[1]


def write_stub(root: Path, stub: Stub) -> None:
    folder = root / stub.rel
    module = stub.short.replace("-", "_")
    src = folder / "src" / "verger" / module
    src.mkdir(parents=True)
    (src / "__init__.py").write_text(f'NAME = "{stub.short}"\n')
    if stub.main:
        (src / "__main__.py").write_text(MAIN % PNG.hex())
    deps = ", ".join(f'"{d}"' for d in stub.deps)
    sources = "".join(
        f"{d.split('>')[0].split('=')[0]} = {{ workspace = true }}\n"
        for d in stub.deps
        if d.startswith("verger-")
    )
    (folder / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""\
            [project]
            name = "verger-{stub.short}"
            version = "{stub.version}"
            description = "stub {stub.short}"
            requires-python = ">=3.11"
            dependencies = [{deps}]

            [project.optional-dependencies]
            test = []

            [build-system]
            requires = ["hatchling>=1.24"]
            build-backend = "hatchling.build"

            [tool.hatch.build.targets.wheel]
            packages = ["src/verger"]

            [tool.uv.sources]
            """
        )
        + sources
    )
    if stub.readme is not None:
        (folder / "README.md").write_text(stub.readme)
    if stub.changelog is not None:
        (folder / "CHANGELOG.md").write_text(stub.changelog)
    if stub.tests is not None:
        (folder / "tests").mkdir()
        (folder / "tests" / f"test_{module}.py").write_text(stub.tests)


def git(root: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    proc = subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, env=env, check=True
    )
    return proc.stdout


def run_nox(root: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300):
    """``python -m nox`` in ``root``; returns the completed process (stdout+stderr together)."""
    drop = ("VERGER_PACKAGES", "VERGER_PYTEST_SUMMARY", "NOXSESSION", "VERGER_QUICK")
    full_env = {k: v for k, v in os.environ.items() if k not in drop}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "nox", "--no-color", *args],
        cwd=root,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def make_workspace(root: Path, *stubs: Stub, git_init: bool = False) -> Path:
    """A workspace at ``root``: the real tooling files plus the given stub members."""
    root.mkdir()
    for name in ("noxfile.py", "pyproject.toml", "uv.lock", "mkdocs.yml", "README.md"):
        shutil.copy(REPO / name, root / name)
    ignore = shutil.ignore_patterns("tests", "__pycache__")
    shutil.copytree(REPO / "ci", root / "ci", ignore=ignore)
    (root / "docs").mkdir()
    for name in ("gen_pages.py", "contributing.md"):
        shutil.copy(REPO / "docs" / name, root / "docs" / name)
    for stub in stubs:
        write_stub(root, stub)
    if git_init:
        git(root, "init", "-q", "-b", "main")
        git(root, "add", "-A")
        git(root, "commit", "-q", "-m", "initial")
    return root
