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


def _run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


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
        for cmd in commands:
            helped = _run(module, cmd, "--help")
            missing = [o for o in SHARED if o not in helped.stdout]
            if helped.returncode != 0 or missing:
                problems.append(f"`{cmd} --help`: exit {helped.returncode}, missing {missing}")
            bad = _run(module, cmd, "--no-such-option")
            if (
                bad.returncode != 2
                or "Traceback" in bad.stderr
                or "--no-such-option" not in bad.stderr
            ):
                problems.append(
                    f"`{cmd} --no-such-option`: exit {bad.returncode} (want 2, one line, no "
                    f"traceback): {bad.stderr.strip()[-300:]}"
                )
            tpu = _run(module, cmd, "--device", "tpu")
            if tpu.returncode != 2 or "Traceback" in tpu.stderr:
                problems.append(f"`{cmd} --device tpu`: exit {tpu.returncode} (want 2)")
            dry = _run(module, cmd, "--quick", "--device", "cpu", "--dry-run", "--out", tmp)
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
