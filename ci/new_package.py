#!/usr/bin/env python3
"""Create a new member from ``ci/template``: ``uvx nox -s new -- <name> [--title "..."]``.

The package follows the verger-core package contract as created: a pyproject with the right
core range, README and CHANGELOG skeletons, ``src/verger/<module>/`` with ``__init__``,
``config`` (the settings dataclasses), ``model``, ``demo``, ``bench`` and ``__main__`` (the
CLI), and ``tests/test_cli.py`` running ``demo --quick`` and ``bench --quick``. It joins every
nox session at once (members are discovered), and the release-please files are updated here.
Stdlib only.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from release_config import sync
from workspace import ROOT

TEMPLATE = Path(__file__).resolve().parent / "template"
NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


def core_range(root: Path) -> tuple[str, str]:
    """``(floor, ceiling)`` for ``verger-core>=floor,<ceiling``: the workspace core's minor."""
    meta = tomllib.loads((root / "shared/core/pyproject.toml").read_text(encoding="utf-8"))
    major, minor = (int(x) for x in meta["project"]["version"].split(".")[:2])
    return f"{major}.{minor}", f"{major}.{minor + 1}"


def render(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    left = re.search(r"\{\{\w+\}\}", text)
    if left:
        raise ValueError(f"template placeholder {left.group(0)} has no value")
    return text


def create(root: Path, name: str, title: str) -> Path:
    """Write ``packages/<name>/`` from the template; returns the folder."""
    if not NAME.match(name):
        raise ValueError(
            f"name {name!r}: use lowercase letters and digits, words joined by '-' (e.g. 'my-method')"
        )
    if name == "core":
        raise ValueError("'core' is verger-core's name")
    folder = root / "packages" / name
    if folder.exists():
        raise ValueError(f"{folder} exists already")
    module = name.replace("-", "_")
    floor, ceiling = core_range(root)
    values = {
        "name": name,
        "module": module,
        "title": title,
        "core_floor": floor,
        "core_ceiling": ceiling,
    }
    targets = {
        "pyproject.toml.tmpl": "pyproject.toml",
        "README.md.tmpl": "README.md",
        "CHANGELOG.md.tmpl": "CHANGELOG.md",
        "tests/test_cli.py.tmpl": "tests/test_cli.py",
    }
    for tmpl in sorted((TEMPLATE / "src").glob("*.tmpl")):
        targets[f"src/{tmpl.name}"] = f"src/verger/{module}/{tmpl.name.removesuffix('.tmpl')}"
    written = []
    try:
        for source, target in targets.items():
            path = folder / target
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(render((TEMPLATE / source).read_text(encoding="utf-8"), values))
            written.append(path)
        (folder / "src" / "verger" / module / "py.typed").write_text("")
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    sync(root, write=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nox -s new --", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="the short name: packages/<name>, verger-<name>")
    parser.add_argument("--title", default="TODO: what the package gives its users, in one line")
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        folder = create(args.root, args.name, args.title)
    except ValueError as exc:
        parser.error(str(exc))
    rel = folder.relative_to(args.root)
    print(
        f"created {rel} (verger-{args.name}, import verger.{args.name.replace('-', '_')})\n"
        "next:\n"
        "  env -u UV_INDEX uv lock                        # the new member joins uv.lock\n"
        f'  uvx nox -s "tests({args.name})" "typecheck({args.name})" "build({args.name})"\n'
        "  then replace model.py, demo.py and bench.py with the method, and fill in the README"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
