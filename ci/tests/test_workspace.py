"""ci/workspace.py: discovery, names and the dependency graph."""

from __future__ import annotations

from pathlib import Path

import pytest
import workspace
from stubs import Stub


def test_discovery_order_names_and_edges(make_workspace) -> None:
    root = make_workspace(
        Stub("packages/zeta", deps=["verger-core>=0.1", "numpy"]),
        Stub("packages/fast-attention", deps=["Verger_Core[gpu]>=0.1 ; python_version>'3'"]),
        Stub("shared/core", main=True),
    )
    members = workspace.discover_members(root)
    assert [m.short for m in members] == ["core", "fast-attention", "zeta"]
    fa = members[1]
    assert (fa.dist, fa.module, fa.rel) == (
        "verger-fast-attention",
        "verger.fast_attention",
        "packages/fast-attention",
    )
    assert fa.verger_deps == ("verger-core",)
    assert members[2].verger_deps == ("verger-core",)
    assert members[0].has_cli and not fa.has_cli
    assert fa.extras == ("test",)


@pytest.mark.parametrize(
    ("req", "name"),
    [
        ("verger-core>=0.1,<0.2", "verger-core"),
        ("Verger_Core", "verger-core"),
        ("torch [cuda] >= 2.4", "torch"),
        ("zope.interface; os_name == 'nt'", "zope-interface"),
        ("pkg @ https://example.com/pkg.whl", "pkg"),
    ],
)
def test_requirement_name(req: str, name: str) -> None:
    assert workspace.requirement_name(req) == name


def _member(short: str, *deps: str) -> workspace.Member:
    return workspace.Member(
        short=short,
        dist=f"verger-{short}",
        path=Path(short),
        rel=short,
        module=f"verger.{short}",
        version="0",
        description="",
        extras=(),
        verger_deps=tuple(f"verger-{d}" for d in deps),
    )


def test_closure_puts_dependencies_first_and_dependents_are_transitive() -> None:
    core, a, b, c = _member("core"), _member("a", "core"), _member("b", "a"), _member("c", "core")
    members = [core, a, b, c]
    assert workspace.closure(b, members) == [core, a, b]
    assert workspace.closure(core, members) == [core]
    assert workspace.dependents([a], members) == [a, b]
    assert workspace.dependents([core], members) == members
    assert workspace.dependents([], members) == []


def test_cycle_is_reported() -> None:
    x, y = _member("x", "y"), _member("y", "x")
    with pytest.raises(ValueError, match="dependency cycle: verger-x -> verger-y -> verger-x"):
        workspace.closure(x, [x, y])


def test_foreign_project_name_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "packages" / "odd").mkdir(parents=True)
    (tmp_path / "packages" / "odd" / "pyproject.toml").write_text('[project]\nname = "odd"\n')
    with pytest.raises(ValueError, match="must start with 'verger-'"):
        workspace.discover_members(tmp_path)


def test_folder_must_match_the_distribution_name(tmp_path: Path) -> None:
    (tmp_path / "packages" / "odd").mkdir(parents=True)
    (tmp_path / "packages" / "odd" / "pyproject.toml").write_text(
        '[project]\nname = "verger-even"\n'
    )
    with pytest.raises(ValueError, match="rename the folder to 'even'"):
        workspace.discover_members(tmp_path)


def test_import_check_rejects_checkout_imports_and_leaks(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from stubs import REPO

    script = str(REPO / "ci" / "import_check.py")

    def check(*args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(tmp_path)}  # like an editable install would
        return subprocess.run(
            [sys.executable, script, *args], capture_output=True, text=True, cwd=tmp_path, env=env
        )

    (tmp_path / "localmod.py").write_text("")
    not_installed = check("localmod")  # importable, but from a checkout, not site-packages
    assert not_installed.returncode == 1 and "not site-packages" in not_installed.stderr
    leak = check("pytest", "--absent", "json", "no_such_module_xyz")
    assert leak.returncode == 1 and "['json']" in leak.stderr
    ok = check("pytest", "--absent", "no_such_module_xyz")
    assert ok.returncode == 0 and ok.stdout.startswith("ok: pytest imports alone from")
