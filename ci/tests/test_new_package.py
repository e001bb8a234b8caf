"""ci/new_package.py: `nox -s new -- <name>` renders the template into a complete member."""

from __future__ import annotations

import json
import re

import new_package
import pytest
import workspace
from stubs import Stub


def test_a_new_member_is_complete_and_joins_the_release_files(make_workspace) -> None:
    root = make_workspace(Stub("shared/core", version="0.3.1"))
    folder = new_package.create(root, "my-method", "Does a thing.")
    module = folder / "src" / "verger" / "my_method"
    for name in ("__init__", "__main__", "config", "model", "demo", "bench"):
        assert "{{" not in (module / f"{name}.py").read_text(), name
    assert re.search(r'PackageCLI\(\s*"verger\.my_method"', (module / "__main__.py").read_text())
    assert (module / "py.typed").exists() and (folder / "tests" / "test_cli.py").exists()
    assert not (folder / "src" / "verger" / "__init__.py").exists()  # a namespace
    member = workspace.read_member(folder / "pyproject.toml", root)
    assert member.dist == "verger-my-method" and member.has_cli
    assert workspace.floor(member, "verger-core") == "0.3"
    assert "verger-core>=0.3,<0.4" in member.requirements
    config = json.loads((root / "release-please-config.json").read_text())
    assert config["packages"]["packages/my-method"]["component"] == "my-method"
    assert "Does a thing." in (folder / "README.md").read_text()


@pytest.mark.parametrize(
    ("name", "message"),
    [("My_Method", "lowercase"), ("core", "verger-core's name"), ("-x", "lowercase")],
)
def test_bad_names_are_refused(make_workspace, name, message) -> None:
    root = make_workspace(Stub("shared/core"))
    with pytest.raises(ValueError, match=message):
        new_package.create(root, name, "t")


def test_an_existing_folder_is_not_overwritten(make_workspace) -> None:
    root = make_workspace(Stub("shared/core"), Stub("packages/taken"))
    with pytest.raises(ValueError, match="exists already"):
        new_package.create(root, "taken", "t")


def test_every_placeholder_in_the_template_has_a_value() -> None:
    used = set()
    for path in new_package.TEMPLATE.rglob("*.tmpl"):
        used |= set(re.findall(r"\{\{(\w+)\}\}", path.read_text()))
    assert used == {"name", "module", "title", "core_floor", "core_ceiling"}
