"""ci/release_config.py: release-please files in step with members; release checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import release_config
import workspace
from stubs import Stub, git


def test_write_adds_members_keeps_released_versions_and_check_agrees(make_workspace) -> None:
    root = make_workspace(Stub("shared/core"), Stub("packages/a", version="0.3.0"))
    (root / release_config.MANIFEST).write_text(json.dumps({"shared/core": "0.0.9", "gone": "1"}))
    assert release_config.main(["--check", "--root", str(root)]) == 1
    assert release_config.main(["--write", "--root", str(root)]) == 0
    config = json.loads((root / release_config.CONFIG).read_text())
    manifest = json.loads((root / release_config.MANIFEST).read_text())
    assert manifest == {"shared/core": "0.0.9", "packages/a": "0.3.0"}
    assert config["packages"]["packages/a"] == {"package-name": "verger-a", "component": "a"}
    assert config["tag-separator"] == "-" and config["include-component-in-tag"] is True
    assert release_config.main(["--check", "--root", str(root)]) == 0


@pytest.mark.parametrize(
    "heading",
    ["## [1.2.0] - 2026-11-27", "## [1.2.0](https://x/compare/a...b) (2026-11-27)"],
)
def test_changelog_section_accepts_both_styles(heading: str) -> None:
    text = f"# C\n\n## [Unreleased]\n\n{heading}\n\n- fixed\n\n## [1.1.0] - 2026-01-01\n- old\n"
    body = release_config.changelog_section(text, "1.2.0")
    assert body is not None and "- fixed" in body and "old" not in body
    assert release_config.changelog_section(text, "1.2") is None
    assert release_config.changelog_section("## [1.2.0]\n- no date\n", "1.2.0") is None


def _problems(root: Path, short: str) -> list[str]:
    member = {m.short: m for m in workspace.discover_members(root)}[short]
    return release_config.release_problems(member, root)


def test_release_problems(make_workspace) -> None:
    root = make_workspace(
        Stub("shared/core", version="0.2.0", changelog="## [0.2.0] - 2026-11-27\n- new\n"),
        Stub("packages/a", deps=["verger-core>=0.1,<0.2"]),
        Stub("packages/b", changelog="# C\n\n## [0.1.0] - 2026-11-27\n\n### Added\n"),
        Stub("packages/c", changelog=None),
        git_init=True,
    )
    release_config.main(["--write", "--root", str(root)])
    assert _problems(root, "core") == []
    git(root, "tag", "core-v0.2.0")
    assert any("tag core-v0.2.0 already exists" in p for p in _problems(root, "core"))
    assert any("requires 'verger-core>=0.1,<0.2'" in p for p in _problems(root, "a"))
    assert any("lists no change" in p for p in _problems(root, "b"))
    assert any("CHANGELOG.md is missing" in p for p in _problems(root, "c"))
    manifest = root / release_config.MANIFEST
    manifest.write_text(json.dumps({"packages/b": "0.0.1"}))
    assert any("says packages/b is at 0.0.1" in p for p in _problems(root, "b"))
    (root / release_config.CONFIG).unlink()
    assert any("not in release-please-config.json" in p for p in _problems(root, "core"))


def test_repository_release_files_cover_committed_members() -> None:
    # The real repository: every member has its release-please entry and a tag name.
    config = json.loads((release_config.ROOT / release_config.CONFIG).read_text())
    for member in workspace.discover_members():
        if member.rel == "shared/core":
            assert config["packages"][member.rel]["component"] == "core"
            assert release_config.tag_name(member) == f"core-v{member.version}"
