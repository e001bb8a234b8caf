"""Every file a member's README links to ships in its sdist (the README is its PyPI page)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import workspace

LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def local_links(readme: Path) -> list[str]:
    """Relative links that stay inside the member's folder."""
    folder = readme.parent.resolve()
    found = []
    for target in LINK.findall(readme.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+:", target) or target.startswith("/"):
            continue  # a URL or an absolute path
        path = (folder / target).resolve()
        if path.is_relative_to(folder):
            found.append(path.relative_to(folder).as_posix())
    return found


def in_sdist(rel: str, includes: list[str]) -> bool:
    return any(rel == inc.strip("/") or rel.startswith(inc.strip("/") + "/") for inc in includes)


@pytest.mark.parametrize("member", workspace.discover_members(), ids=lambda m: m.short)
def test_readme_links_are_in_the_sdist(member) -> None:
    readme = member.path / "README.md"
    if not readme.is_file():
        pytest.skip("no README")
    meta = tomllib.loads((member.path / "pyproject.toml").read_text(encoding="utf-8"))
    includes = meta["tool"]["hatch"]["build"]["targets"]["sdist"]["include"]
    missing = [rel for rel in local_links(readme) if not in_sdist(rel, includes)]
    assert missing == [], (
        f"{member.rel}/README.md links {missing}, left out of the sdist {includes}"
    )


def test_the_link_reader(tmp_path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "README.md").write_text(
        "[a](PERF.md) [b](src/x.py#L3) [c](https://x.org) [d](../../shared/core/) [e](#top)"
    )
    assert local_links(pkg / "README.md") == ["PERF.md", "src/x.py"]
    assert in_sdist("src/x.py", ["src", "README.md"]) and not in_sdist("PERF.md", ["src"])
