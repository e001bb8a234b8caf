"""nox sessions for the verger workspace.

Every member (``shared/*`` and ``packages/*`` folders with a ``pyproject.toml``) is discovered at
load time, so a new package joins every parametrized session without an edit here. Each session
installs only the member under test, verger-core and the member's declared dependencies, so a
missing dependency fails its run.

Select members with ``VERGER_PACKAGES=core,fast-attention nox -s tests`` or directly by session
name: ``nox -s "tests(fast-attention)"``.

On machines whose pip is configured with local wheel indexes (``pip config get
global.extra-index-url``), those indexes are handed to uv at run time, so torch is not fetched
again from PyPI. Nothing machine-specific is written in this file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
BUILD = ROOT / "build"

nox.options.default_venv_backend = "uv"
nox.options.reuse_existing_virtualenvs = False
nox.options.sessions = ["lint", "tests"]

TEST_TOOLS = ["pytest>=8", "pytest-timeout>=2.3"]


@dataclass(frozen=True)
class Member:
    """One workspace member: where it lives and how it is named and imported."""

    short: str  # "core", "fast-attention": the session parameter
    dist: str  # "verger-core": the distribution name
    path: Path
    module: str  # "verger.core"
    extras: tuple[str, ...]
    verger_deps: tuple[str, ...]  # other workspace members this one depends on (dist names)

    @property
    def rel(self) -> str:
        return self.path.relative_to(ROOT).as_posix()


def _dep_name(requirement: str) -> str:
    name = requirement
    for sep in "<>=!~;[ (":
        name = name.split(sep, 1)[0]
    return name.strip().lower().replace("_", "-")


def discover_members(root: Path = ROOT) -> list[Member]:
    """Every workspace member, core first, then packages in alphabetical order."""
    members = []
    for pyproject in sorted(root.glob("shared/*/pyproject.toml")) + sorted(
        root.glob("packages/*/pyproject.toml")
    ):
        meta = tomllib.loads(pyproject.read_text())["project"]
        dist = meta["name"]
        short = dist.removeprefix("verger-")
        deps = tuple(
            d for d in map(_dep_name, meta.get("dependencies", [])) if d.startswith("verger-")
        )
        members.append(
            Member(
                short=short,
                dist=dist,
                path=pyproject.parent,
                module="verger." + short.replace("-", "_"),
                extras=tuple(meta.get("optional-dependencies", {})),
                verger_deps=deps,
            )
        )
    return members


def _select(members: list[Member]) -> list[Member]:
    wanted = os.environ.get("VERGER_PACKAGES", "").strip()
    if not wanted:
        return members
    by_name = {m.short: m for m in members} | {m.dist: m for m in members}
    chosen, unknown = [], []
    for name in (w.strip() for w in wanted.split(",") if w.strip()):
        (chosen.append(by_name[name]) if name in by_name else unknown.append(name))
    if unknown:
        valid = ", ".join(m.short for m in members)
        sys.exit(f"VERGER_PACKAGES names unknown package(s) {unknown}; valid choices: {valid}")
    return chosen


ALL_MEMBERS = discover_members()
MEMBERS = _select(ALL_MEMBERS)
BY_SHORT = {m.short: m for m in ALL_MEMBERS}
NAMES = [m.short for m in MEMBERS]


def _local_indexes() -> str | None:
    """The extra indexes this machine's pip is configured with, read at run time."""
    if os.environ.get("UV_INDEX"):
        return os.environ["UV_INDEX"]
    pip = shutil.which("pip") or shutil.which("pip3")
    if not pip:
        return None
    try:
        out = subprocess.run(
            [pip, "config", "get", "global.extra-index-url"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


_INDEXES = _local_indexes()
if _INDEXES:
    os.environ["UV_INDEX"] = _INDEXES


def _member(package: str) -> Member:
    if package not in BY_SHORT:
        valid = ", ".join(BY_SHORT)
        raise SystemExit(f"unknown package {package!r}; valid choices: {valid}")
    return BY_SHORT[package]


def _closure(member: Member) -> list[Member]:
    """The member and every workspace member it depends on (dependencies first)."""
    by_dist = {m.dist: m for m in ALL_MEMBERS}
    order: list[Member] = []

    def visit(m: Member) -> None:
        for dep in m.verger_deps:
            if dep in by_dist and by_dist[dep] not in order:
                visit(by_dist[dep])
        if m not in order:
            order.append(m)

    visit(member)
    return order


def install_member(session: nox.Session, member: Member, *extras: str) -> None:
    """Install the member (editable) with its workspace dependencies and the given extras."""
    wanted = [e for e in extras if e in member.extras]
    spec = member.rel + (f"[{','.join(wanted)}]" if wanted else "")
    args: list[str] = []
    for dep in _closure(member)[:-1]:
        args += ["-e", dep.rel]
    session.install(*args, "-e", spec)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole tree."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
@nox.parametrize("package", NAMES, ids=NAMES)
def typecheck(session: nox.Session, package: str) -> None:
    """mypy on one member, installed with its dependencies."""
    member = _member(package)
    install_member(session, member)
    session.install("mypy>=1.11")
    session.run("mypy", "-p", member.module)


@nox.session
@nox.parametrize("package", NAMES, ids=NAMES)
def tests(session: nox.Session, package: str) -> None:
    """pytest on CPU (Triton kernels through the interpreter); slow and gpu cases excluded."""
    member = _member(package)
    install_member(session, member, "test")
    session.install(*TEST_TOOLS)
    marker = "not gpu and not slow"
    args = session.posargs or ["-m", marker]
    session.run("pytest", f"{member.rel}/tests", *args, env={"PYTHONHASHSEED": "0"})


@nox.session(default=False)
@nox.parametrize("package", NAMES, ids=NAMES)
def tests_gpu(session: nox.Session, package: str) -> None:
    """The CUDA-only tests of one member (needs a GPU; not run by default)."""
    member = _member(package)
    install_member(session, member, "test", "gpu")
    session.install(*TEST_TOOLS)
    code = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    try:
        session.run("python", "-c", code, silent=True)
    except nox.command.CommandFailed:
        session.skip("no CUDA device visible")
    session.run(
        "pytest", f"{member.rel}/tests", "-m", "gpu", *session.posargs, success_codes=[0, 5]
    )


def _run_cli(session: nox.Session, member: Member, command: str, extra: list[str]) -> Path:
    out = BUILD / command / member.short
    session.run("python", "-m", member.module, command, "--out", str(out), *extra)
    return out


@nox.session(default=False)
@nox.parametrize("package", NAMES, ids=NAMES)
def demo(session: nox.Session, package: str) -> None:
    """Run the member's demo (the paper in miniature); results under build/demo/<package>."""
    member = _member(package)
    install_member(session, member, "demo")
    _run_cli(session, member, "demo", session.posargs or ["--quick"])
    session.notify("report")


@nox.session(default=False)
@nox.parametrize("package", NAMES, ids=NAMES)
def bench(session: nox.Session, package: str) -> None:
    """Run the member's benchmarks; metrics.json under build/bench/<package>."""
    member = _member(package)
    install_member(session, member, "bench")
    _run_cli(session, member, "bench", session.posargs or ["--quick"])
    session.notify("report")


@nox.session(venv_backend="none", default=False)
def report(session: nox.Session) -> None:
    """Combine every build/{demo,bench}/<package>/metrics.json into build/report.md."""
    lines = ["# verger: combined report", ""]
    found = 0
    for kind in ("demo", "bench"):
        for metrics in sorted((BUILD / kind).glob("*/metrics.json")):
            data = json.loads(metrics.read_text())
            found += 1
            lines += [f"## {metrics.parent.name} ({kind})", "", "| metric | value |", "|---|---|"]
            for key, value in data.items():
                shown = f"{value:.4g}" if isinstance(value, float) else str(value)
                lines.append(f"| `{key}` | {shown} |")
            lines.append("")
    if not found:
        session.error("no build/demo/*/metrics.json or build/bench/*/metrics.json to report on")
    BUILD.mkdir(exist_ok=True)
    target = BUILD / "report.md"
    tmp = target.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(target)
    session.log(f"combined report of {found} runs: {target}")


@nox.session(default=False)
@nox.parametrize("package", NAMES, ids=NAMES)
def build(session: nox.Session, package: str) -> None:
    """Build the member's wheel and sdist, install the wheel alone in this fresh venv, import it."""
    member = _member(package)
    dist = BUILD / "dist"
    session.run("uv", "build", "--package", member.dist, "--out-dir", str(dist), external=True)
    for dep in _closure(member)[:-1]:  # workspace deps are not on the index: build them too
        session.run("uv", "build", "--package", dep.dist, "--out-dir", str(dist), external=True)
    wheel_name = member.dist.replace("-", "_")
    session.install("--find-links", str(dist), f"{member.dist}", "--reinstall-package", member.dist)
    others = [m.module for m in ALL_MEMBERS if m not in _closure(member)]
    check = (
        "import importlib, importlib.util, sys\n"
        f"mod = importlib.import_module({member.module!r})\n"
        "assert 'site-packages' in (mod.__file__ or ''), mod.__file__\n"
        f"leaked = [m for m in {others!r} if importlib.util.find_spec(m) is not None]\n"
        "assert not leaked, f'installed but not asked for: {leaked}'\n"
        f"print('ok', {wheel_name!r}, mod.__file__)\n"
    )
    session.chdir(session.create_tmp())  # import from the installed wheel, not the checkout
    session.run("python", "-c", check)


@nox.session(default=False)
@nox.parametrize("package", NAMES, ids=NAMES)
def release(session: nox.Session, package: str) -> None:
    """Check the member is releasable (CHANGELOG has an entry for its version) and build it."""
    member = _member(package)
    version = tomllib.loads((member.path / "pyproject.toml").read_text())["project"]["version"]
    changelog = (member.path / "CHANGELOG.md").read_text()
    if f"## [{version}]" not in changelog:
        session.error(
            f"{member.rel}/CHANGELOG.md has no '## [{version}]' section for the version in "
            f"{member.rel}/pyproject.toml; add one before tagging {member.short}-v{version}"
        )
    session.notify(f"build({member.short})")
    session.log(f"ready: tag {member.short}-v{version} after build({member.short}) passes")
