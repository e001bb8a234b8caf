#!/usr/bin/env python3
"""Run the GPU tests, benchmarks and report in the current Python environment, without nox.

For machines that cannot create environments (offline GPU hosts with torch, triton and pytest
preinstalled): members are imported from their source folders through PYTHONPATH instead of
being installed, so a dependency the host lacks shows up as a failure.

    python3 ci/here.py tests_gpu      # each member's @pytest.mark.gpu tests
    python3 ci/here.py bench [--full] # each member's `python -m verger.<name> bench`
    python3 ci/here.py report         # build/report.md from build/*/<name>/metrics.json

VERGER_PACKAGES=core,maeclip narrows the members, as with nox. ``ci/gpu-check.sh --here``
runs all three.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CI = Path(__file__).resolve().parent
sys.path[:0] = [str(CI), str(CI / "pytest_plugin")]
import results  # noqa: E402
import verger_ci_summary  # noqa: E402
from workspace import ROOT, Member, discover_members  # noqa: E402

BUILD = ROOT / "build"


def select(members: list[Member], wanted: str) -> list[Member]:
    """The members named in ``wanted`` (comma-separated), or all; exits on unknown names."""
    names = [w.strip() for w in wanted.split(",") if w.strip()]
    unknown = sorted(set(names) - {m.short for m in members})
    if unknown:
        valid = ", ".join(m.short for m in members)
        sys.exit(f"VERGER_PACKAGES names unknown package(s) {unknown}; valid choices: {valid}")
    return [m for m in members if not names or m.short in names]


def environment(members: list[Member]) -> dict[str, str]:
    paths = [str(m.path / "src") for m in members] + [str(CI / "pytest_plugin")]
    old = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, *([old] if old else [])])}


def tests_gpu(chosen: list[Member], env: dict[str, str]) -> list[tuple[str, bool, str]]:
    rows = []
    for m in chosen:
        if not (m.path / "tests").is_dir():
            rows.append((m.short, True, "no tests/ folder"))
            continue
        out = BUILD / "test-results" / f"here-tests_gpu-{m.short}.json"
        out.unlink(missing_ok=True)
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "pytest", f"{m.rel}/tests", "-m", "gpu"]
        cmd += ["-p", "verger_ci_summary", "-q"]
        print(f"--- {m.short}: {' '.join(cmd[2:])}", flush=True)
        code = subprocess.run(
            cmd, cwd=ROOT, env={**env, "VERGER_PYTEST_SUMMARY": str(out)}
        ).returncode
        summary = json.loads(out.read_text()) if out.is_file() else None
        rows.append(
            (
                m.short,
                code in (0, 5),
                verger_ci_summary.describe(summary, time.perf_counter() - start),
            )
        )
    return rows


def bench(chosen: list[Member], env: dict[str, str], full: bool) -> list[tuple[str, bool, str]]:
    rows = []
    for m in chosen:
        if not m.has_cli:
            rows.append((m.short, True, f"skipped: no python -m {m.module} yet"))
            continue
        cmd = [sys.executable, "-m", m.module, "bench", "--out", str(BUILD / "bench" / m.short)]
        cmd += [] if full else ["--quick"]
        print(f"--- {m.short}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        code = subprocess.run(cmd, cwd=ROOT, env=env).returncode
        rows.append((m.short, code == 0, f"exit {code} in {time.perf_counter() - start:.0f}s"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["tests_gpu", "bench", "report"])
    parser.add_argument("--full", action="store_true", help="bench without --quick")
    args = parser.parse_args(argv)
    members = discover_members()
    chosen = select(members, os.environ.get("VERGER_PACKAGES", ""))
    if args.command == "report":
        target, found = results.write_report(members, BUILD)
        print(f"combined report of {found} run(s): {target}")
        return 0
    env = environment(members)
    rows = tests_gpu(chosen, env) if args.command == "tests_gpu" else bench(chosen, env, args.full)
    print(f"\nverger {args.command} summary (this environment: {sys.executable}):")
    for short, ok, line in rows:
        print(f"  {short:<16} {'ok' if ok else 'FAILED':<7} {line}")
    return 0 if all(ok for _, ok, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
