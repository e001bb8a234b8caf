#!/usr/bin/env python3
"""Release helpers: keep the release-please manifest in step with the members, check a release.

Each member versions independently: its pyproject ``[project] version`` is the single source,
its CHANGELOG.md has a ``## [X.Y.Z] - YYYY-MM-DD`` section per release, and its tag is
``<short>-vX.Y.Z`` (``core-v0.1.0``). release-please (manifest mode) reads
``release-please-config.json`` (one entry per member folder) and
``.release-please-manifest.json`` (the last released version of each).

    python ci/release_config.py --check   # exit 1 if a member is missing from the two files
    python ci/release_config.py --write   # add new members (at their pyproject version), drop gone ones

``nox -s "release(<name>)"`` calls :func:`release_problems` before building the artifacts.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workspace import ROOT, Member, discover_members, requirement_name

CONFIG = "release-please-config.json"
MANIFEST = ".release-please-manifest.json"
BASE_CONFIG: dict[str, Any] = {
    "$schema": "https://raw.githubusercontent.com/googleapis/release-please/main/schemas/config.json",
    "release-type": "python",
    "include-component-in-tag": True,
    "include-v-in-tag": True,
    "tag-separator": "-",
    "separate-pull-requests": True,
    "bump-minor-pre-major": True,
    "changelog-path": "CHANGELOG.md",
    "packages": {},
}


def tag_name(member: Member) -> str:
    """The git tag of the member's current version: ``<short>-v<version>``."""
    return f"{member.short}-v{member.version}"


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def expected(
    members: list[Member], config: dict[str, Any], manifest: dict[str, str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The config and manifest with one entry per member; released versions are kept."""
    new_config = {**BASE_CONFIG, **{k: v for k, v in config.items() if k != "packages"}}
    old_packages = config.get("packages", {})
    new_config["packages"] = {
        m.rel: {**old_packages.get(m.rel, {}), "package-name": m.dist, "component": m.short}
        for m in members
    }
    new_manifest = {m.rel: manifest.get(m.rel, m.version) for m in members}
    return new_config, new_manifest


def sync(root: Path, *, write: bool) -> list[str]:
    """The differences between the release-please files and the members; fixed if ``write``."""
    members = discover_members(root)
    config, manifest = _read_json(root / CONFIG), _read_json(root / MANIFEST)
    new_config, new_manifest = expected(members, config, manifest)
    diffs = []
    for rel in sorted(set(new_config["packages"]) ^ set(config.get("packages", {}))):
        diffs.append(f"{CONFIG}: {'add' if rel in new_config['packages'] else 'remove'} {rel}")
    if new_config["packages"] != config.get("packages") and not diffs:
        diffs.append(f"{CONFIG}: package names or components differ from the pyprojects")
    for rel in sorted(set(new_manifest) ^ set(manifest)):
        diffs.append(f"{MANIFEST}: {'add' if rel in new_manifest else 'remove'} {rel}")
    if write and (new_config != config or new_manifest != manifest):
        for name, data in ((CONFIG, new_config), (MANIFEST, new_manifest)):
            tmp = root / (name + ".tmp")
            tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
            tmp.replace(root / name)
    return diffs


def changelog_section(text: str, version: str) -> str | None:
    """The body of the ``## [version]`` section (Keep a Changelog or release-please style)."""
    head = re.compile(
        rf"^## \[{re.escape(version)}\](?:\([^)]*\))? (?:- (\d{{4}}-\d{{2}}-\d{{2}})|\((\d{{4}}-\d{{2}}-\d{{2}})\))\s*$",
        re.MULTILINE,
    )
    match = head.search(text)
    if match is None:
        return None
    rest = text[match.end() :]
    following = re.search(r"^## ", rest, re.MULTILINE)
    return rest[: following.start()] if following else rest


def _dependency_problems(member: Member, members: list[Member]) -> list[str]:
    try:
        from packaging.requirements import Requirement
    except ImportError:  # packaging comes with nox and pip; skip the check without it
        return []
    versions = {m.dist: m.version for m in members}
    meta = tomllib.loads((member.path / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    problems = []
    for raw in meta.get("dependencies", []):
        req = Requirement(raw)
        dist = requirement_name(req.name)
        if dist in versions and not req.specifier.contains(versions[dist], prereleases=True):
            problems.append(
                f"requires {raw!r} but the workspace has {dist} {versions[dist]}: test against "
                f"that version and update the range (or release {dist} first)"
            )
    return problems


def _tag_exists(root: Path, tag: str) -> bool:
    found = subprocess.run(
        ["git", "-C", str(root), "tag", "--list", tag], capture_output=True, text=True, check=False
    )
    return bool(found.stdout.strip())


def _floor_problems(member: Member, members: list[Member], root: Path) -> list[str]:
    """A member may only promise what is on the index: each verger floor must be released."""
    from workspace import floor, version_key

    problems = []
    for dep in (m for m in members if m.dist in member.verger_deps):
        low = floor(member, dep.dist)
        if low is None:
            problems.append(f"requires {dep.dist} without a '>=' floor: state the lowest version")
            continue
        tag = f"{dep.short}-v{'.'.join(map(str, version_key(low)))}"
        if not _tag_exists(root, tag):
            problems.append(
                f"requires {dep.dist}>={low}, which is not released (no tag {tag}): release "
                f"{dep.dist} {low} first, or lower the floor to a released version that has "
                "everything this package imports (tests_lowest_core checks it)"
            )
    return problems


def release_problems(member: Member, root: Path = ROOT) -> list[str]:
    """Every reason ``member`` cannot be released as it stands; empty when it can."""
    problems = []
    changelog = member.path / "CHANGELOG.md"
    tag = tag_name(member)
    if not changelog.is_file():
        problems.append(f"{member.rel}/CHANGELOG.md is missing")
    else:
        body = changelog_section(changelog.read_text(encoding="utf-8"), member.version)
        if body is None:
            problems.append(
                f"{member.rel}/CHANGELOG.md has no '## [{member.version}] - YYYY-MM-DD' section "
                f"for the version in {member.rel}/pyproject.toml"
            )
        elif not re.search(r"^\s*[-*] \S", body, re.MULTILINE):
            problems.append(
                f"{member.rel}/CHANGELOG.md: section [{member.version}] lists no change"
            )
    manifest = _read_json(root / MANIFEST)
    if manifest.get(member.rel) not in (None, member.version):
        problems.append(
            f"{MANIFEST} says {member.rel} is at {manifest[member.rel]} but its pyproject says "
            f"{member.version}: set the manifest to {member.version} in the release commit"
        )
    if member.rel not in _read_json(root / CONFIG).get("packages", {}):
        problems.append(f"{member.rel} is not in {CONFIG}: run python ci/release_config.py --write")
    if _tag_exists(root, tag):
        problems.append(
            f"tag {tag} already exists: bump the version in {member.rel}/pyproject.toml"
        )
    members = discover_members(root)
    return problems + _dependency_problems(member, members) + _floor_problems(member, members, root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 if the files are out of date")
    mode.add_argument("--write", action="store_true", help="bring the files up to date")
    parser.add_argument("--root", type=Path, default=ROOT, help="workspace root")
    args = parser.parse_args(argv)
    diffs = sync(args.root, write=args.write)
    for line in diffs:
        print(("fixed: " if args.write else "out of date: ") + line)
    return 1 if diffs and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
