"""The noxfile end to end, on throw-away workspaces of stub members (no torch needed)."""

from __future__ import annotations

import json
import re

import pytest
from stubs import REPO, Stub, run_nox

GPU_ONLY = "import pytest\n\n@pytest.mark.gpu\ndef test_cuda():\n    assert False\n"
FAILING = "def test_ok():\n    pass\n\ndef test_bad():\n    assert 1 == 2\n"


def test_every_session_is_listed_for_a_new_member_without_editing_the_noxfile(
    make_workspace,
) -> None:
    root = make_workspace(Stub("shared/core"), Stub("packages/brand-new", deps=["verger-core"]))
    proc = run_nox(root, "-l")
    assert proc.returncode == 0, proc.stderr
    for session in ("typecheck", "tests", "tests_gpu", "demo", "bench", "build", "release"):
        for member in ("core", "brand-new"):
            assert f"{session}({member})" in proc.stdout
    for session in ("lint", "tests(tooling)", "report", "docs"):
        assert session in proc.stdout
    assert re.search(r"^\* tests\(brand-new\)", proc.stdout, re.MULTILINE)  # default
    assert re.search(r"^- tests_gpu\(brand-new\)", proc.stdout, re.MULTILINE)  # not default


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["-s", "tests(nope)"], {}, "valid choices for tests: core, a, tooling"),
        (["-s", "lint", "build(package='nope')"], {}, "valid choices for build: core, a"),
        (["--session=demo(tooling)"], {}, "valid choices for demo: core, a"),
        ([], {"NOXSESSION": "tests_gpu(x)"}, "valid choices for tests_gpu: core, a"),
        (["-s", "tests"], {"VERGER_PACKAGES": "core,nope"}, "valid choices: core, a"),
        (["-s", "lint", "test"], {}, "unknown session 'test'; valid sessions: lint, typecheck"),
    ],
)
def test_unknown_package_names_fail_with_the_valid_choices(
    make_workspace, args: list[str], env: dict[str, str], message: str
) -> None:
    root = make_workspace(Stub("shared/core"), Stub("packages/a"))
    proc = run_nox(root, *args, env=env)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Running session" not in proc.stderr  # rejected before any work


def test_posargs_after_double_dash_are_not_session_names(make_workspace) -> None:
    root = make_workspace(Stub("shared/core"))
    proc = run_nox(root, "-l", "--", "tests(nope)")
    assert proc.returncode == 0, proc.stderr


def test_demo_runs_members_with_a_cli_skips_the_others_then_reports(make_workspace) -> None:
    root = make_workspace(Stub("shared/core", main=True), Stub("packages/a", deps=["verger-core"]))
    proc = run_nox(root, "-s", "demo")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((root / "build/demo/core/metrics.json").read_text())
    assert metrics == {"command": "demo", "quick": True, "ratio": 0.5}
    assert "verger.a has no __main__.py yet" in proc.stderr
    report = (root / "build/report.md").read_text()
    assert "| `ratio` | 0.5 |" in report
    assert "![core demo: curve](demo/core/curve.png)" in report
    assert "[demo/core/report.md](demo/core/report.md)" in report
    section_a = report.split("## a\n")[1]
    assert "no `python -m verger.a` command yet" in section_a
    # ...and the docs site was built with the same results page and the plot copied.
    results_html = (root / "build/site/results/index.html").read_text()
    assert "ratio" in results_html and 'src="demo/core/curve.png"' in results_html
    assert (root / "build/site/results/demo/core/curve.png").read_bytes()[:4] == b"\x89PNG"


def test_docs_build_strict_over_stub_members(make_workspace) -> None:
    readme = "# verger-a\n\n[changes](CHANGELOG.md), [code](src/), [core](../../shared/core/)\n"
    root = make_workspace(Stub("shared/core"), Stub("packages/a", readme=readme))
    proc = run_nox(root, "-s", "docs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = (root / "build/site/packages/a/index.html").read_text()
    assert 'href="changelog/"' in page and 'href="../core/"' in page


def test_test_sessions_summarize_and_handle_no_tests(make_workspace) -> None:
    root = make_workspace(
        Stub("shared/core"),
        Stub("packages/gpu-only", tests=GPU_ONLY),
        Stub("packages/no-tests", tests=""),
        Stub("packages/failing", tests=FAILING),
        Stub("packages/no-folder", tests=None),
    )
    proc = run_nox(root, "-s", "tests", env={"VERGER_PACKAGES": "core,gpu-only,no-tests,failing"})
    assert proc.returncode != 0
    summary = proc.stderr.split("verger test summary:")[1]
    lines = {line.split()[0]: line for line in summary.strip().splitlines()}
    assert set(lines) == {"tests(core)", "tests(gpu-only)", "tests(no-tests)", "tests(failing)"}
    assert re.search(r"passed\s+1 passed, 0 failed, 0 errors, 0 skipped;", lines["tests(core)"])
    assert re.search(r"empty\s+0 passed, .*1 deselected", lines["tests(gpu-only)"])
    assert "FAILED  no tests collected" in lines["tests(no-tests)"]
    assert re.search(r"FAILED\s+1 passed, 1 failed", lines["tests(failing)"])
    one = run_nox(root, "-s", "tests(no-folder)")
    assert one.returncode != 0 and "packages/no-folder/tests does not exist" in one.stderr
    assert re.search(
        r"tests\(no-folder\)\s+FAILED\s+no packages/no-folder/tests folder", one.stderr
    )
    # pytest arguments keep the CPU marker selection unless they bring their own -m.
    picked = run_nox(root, "-s", "tests(gpu-only)", "--", "-k", "cuda")
    assert picked.returncode == 0 and "1 deselected" in picked.stderr
    forced = run_nox(root, "-s", "tests(gpu-only)", "--", "-m", "gpu")
    assert forced.returncode != 0 and re.search(r"0 passed, 1 failed", forced.stderr)


def test_build_installs_the_wheel_alone(make_workspace) -> None:
    root = make_workspace(
        Stub("shared/core"), Stub("packages/a", deps=["verger-core>=0.1"]), Stub("packages/c")
    )
    proc = run_nox(root, "-s", "build(a)")
    assert proc.returncode == 0, proc.stderr
    output = proc.stdout + proc.stderr
    assert "ok: verger.a imports alone from" in output
    assert "site-packages/verger/a/__init__.py" in output
    assert "--absent verger.c" in output  # the unrelated member is checked to be absent
    built = sorted(p.name for p in (root / "build/dist/a").rglob("*.whl"))
    assert built == ["verger_a-0.1.0-py3-none-any.whl", "verger_core-0.1.0-py3-none-any.whl"]


def test_ci_entry_runs_the_readme_test_command() -> None:
    run_script = (REPO / ".ci/run").read_text()
    assert "uvx nox -s tests" in run_script
    assert "uvx nox -s tests" in (REPO / "README.md").read_text()


def test_a_broken_member_pyproject_is_named_without_a_traceback(make_workspace) -> None:
    root = make_workspace(Stub("shared/core"))
    (root / "packages/half").mkdir(parents=True)
    (root / "packages/half/pyproject.toml").write_text("[project\nname = ")
    proc = run_nox(root, "-l")
    assert proc.returncode != 0
    assert "packages/half/pyproject.toml: not a valid member pyproject" in proc.stderr
    assert "Traceback" not in proc.stderr
