"""ci/cli_contract.py: a member's command line checked against the package contract."""

from __future__ import annotations

import textwrap

import cli_contract
import pytest

GOOD = textwrap.dedent(
    """
    import argparse, json, sys
    p = argparse.ArgumentParser(prog="good")
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("demo", "bench"):
        s = sub.add_parser(name)
        for flag in ("--out", "--device", "--seed", "--threads"):
            s.add_argument(flag)
        for flag in ("--quick", "--resume", "--overwrite", "--dry-run"):
            s.add_argument(flag, action="store_true")
    args = p.parse_args()
    if args.device not in (None, "cpu", "auto"):
        p.error(f"argument --device: {args.device!r} is not a device")
    if args.dry_run:
        print(json.dumps({"device": args.device}))
    """
)
BAD = GOOD.replace('p.error(f"argument --device', 'raise ValueError(f"argument --device')


@pytest.fixture()
def module(tmp_path, monkeypatch):
    def make(name: str, source: str) -> str:
        pkg = tmp_path / name
        pkg.mkdir()
        (pkg / "__init__.py").write_text("")
        (pkg / "__main__.py").write_text(source)
        monkeypatch.setenv("PYTHONPATH", str(tmp_path))
        return name

    return make


def test_a_contract_following_cli_passes(module) -> None:
    assert cli_contract.check(module("goodcli", GOOD)) == []


def test_a_traceback_on_a_bad_device_is_reported_per_command(module) -> None:
    problems = cli_contract.check(module("badcli", BAD))
    assert [p.split("`")[1] for p in problems] == ["demo --device tpu", "bench --device tpu"]


def test_commands_are_read_from_the_top_level_usage() -> None:
    assert cli_contract.commands_of("usage: x [-h] {demo,bench,plan-early} ...") == [
        "demo",
        "bench",
        "plan-early",
    ]
