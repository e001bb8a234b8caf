#!/usr/bin/env python3
"""Check a member's command line against the package contract (stdlib only).

    python ci/cli_contract.py verger.fast_attention     # in an env where the member is installed

For every subcommand: ``--help`` exits 0 and lists the shared options; an unknown option
exits 2 with one usage error and no traceback; ``--device tpu`` exits 2; ``--quick --device cpu
--dry-run`` exits 0 and resolves the device to ``cpu``. ``tests(<name>)`` runs it after pytest
for every member with a ``__main__``. Exit 1 and one line per broken rule otherwise.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile

SHARED = ("--out", "--quick", "--device", "--seed", "--threads", "--resume", "--overwrite")


# Run in the child: each command line through ``runpy`` in one interpreter, so that torch and
# the member are imported once (a process per call made the check minutes long for packages
# with heavy imports). A command line's exit code, stdout and stderr are what a separate
# process would give: SystemExit is its code, an escaping exception prints a traceback, exit 1.
_CHILD = """
import contextlib, io, json, runpy, sys, traceback
module, argvs = json.loads(sys.stdin.read())
results = []
for argv in argvs:
    out, err = io.StringIO(), io.StringIO()
    code = 0
    sys.argv = [module, *argv]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if stop.code is not None and not isinstance(stop.code, int):
                print(stop.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append([code, out.getvalue(), err.getvalue()])
sys.__stdout__.write(json.dumps(results))
"""


def _run_all(module: str, argvs: list[list[str]]) -> list[subprocess.CompletedProcess[str]]:
    """Each command line's result, as if run as ``python -m module *argv``."""
    child = subprocess.run(
        [sys.executable, "-c", _CHILD],
        input=json.dumps([module, argvs]),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    try:
        results = json.loads(child.stdout)
    except ValueError:
        failed = subprocess.CompletedProcess(["python", "-m", module], 1, "", child.stderr)
        return [failed for _ in argvs]
    return [
        subprocess.CompletedProcess([sys.executable, "-m", module, *argv], code, out, err)
        for argv, (code, out, err) in zip(argvs, results, strict=True)
    ]


def _run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return _run_all(module, [list(args)])[0]


def commands_of(help_text: str) -> list[str]:
    """The subcommands listed in a ``COMMAND`` choice line of the top-level help."""
    match = re.search(r"\{([\w,-]+)\}", help_text)
    return match.group(1).split(",") if match else []


def check(module: str) -> list[str]:
    """Every broken rule of ``module``'s CLI, as lines; empty when it follows the contract."""
    problems: list[str] = []
    top = _run(module, "--help")
    if top.returncode != 0:
        return [f"`{module} --help` exited {top.returncode}: {top.stderr.strip()[-300:]}"]
    commands = commands_of(top.stdout)
    if not commands:
        return [f"`{module} --help` lists no subcommands (the contract's PackageCLI does)"]
    with tempfile.TemporaryDirectory() as tmp:
        argvs = []
        for cmd in commands:
            argvs += [
                [cmd, "--help"],
                [cmd, "--no-such-option"],
                [cmd, "--device", "tpu"],
                [cmd, "--quick", "--device", "cpu", "--dry-run", "--out", tmp],
            ]
        results = iter(_run_all(module, argvs))
        for cmd in commands:
            helped, bad, tpu, dry = (next(results) for _ in range(4))
            missing = [o for o in SHARED if o not in helped.stdout]
            if helped.returncode != 0 or missing:
                problems.append(f"`{cmd} --help`: exit {helped.returncode}, missing {missing}")
            if (
                bad.returncode != 2
                or "Traceback" in bad.stderr
                or "--no-such-option" not in bad.stderr
            ):
                problems.append(
                    f"`{cmd} --no-such-option`: exit {bad.returncode} (want 2, one line, no "
                    f"traceback): {bad.stderr.strip()[-300:]}"
                )
            if tpu.returncode != 2 or "Traceback" in tpu.stderr:
                problems.append(f"`{cmd} --device tpu`: exit {tpu.returncode} (want 2)")
            try:
                device = json.loads(dry.stdout)["device"] if dry.returncode == 0 else None
            except (ValueError, KeyError, TypeError):
                device = None
            if device != "cpu":
                problems.append(
                    f"`{cmd} --quick --device cpu --dry-run`: exit {dry.returncode}, device "
                    f"{device!r} (want 'cpu'): {dry.stderr.strip()[-300:]}"
                )
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python ci/cli_contract.py verger.<name>", file=sys.stderr)
        return 2
    problems = check(argv[0])
    for line in problems:
        print(f"{argv[0]}: {line}", file=sys.stderr)
    if not problems:
        print(f"{argv[0]}: the command line follows the package contract")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
