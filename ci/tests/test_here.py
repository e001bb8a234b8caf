"""ci/here.py: the GPU check's no-install mode, on stub members in this Python environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from stubs import Stub

GPU_TEST = "import pytest\n\n@pytest.mark.gpu\ndef test_gpu_path():\n    assert 2 * 2 == 4\n"


def here(root: Path, *args: str, packages: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VERGER_PACKAGES", "PYTHONPATH")}
    env |= {"VERGER_PACKAGES": packages} if packages else {}
    return subprocess.run(
        [sys.executable, str(root / "ci/here.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


def test_tests_bench_and_report_without_installing(make_workspace) -> None:
    root = make_workspace(
        Stub("shared/core", main=True, tests=GPU_TEST),
        Stub("packages/a", deps=["verger-core"], tests="def test_cpu():\n    pass\n"),
        Stub(
            "packages/bad", tests="import pytest\n\n@pytest.mark.gpu\ndef test_x():\n    assert 0\n"
        ),
    )
    tests = here(root, "tests_gpu", packages="core,a")
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "core             ok      1 passed, 0 failed" in tests.stdout
    assert "a                ok      0 passed" in tests.stdout and "1 deselected" in tests.stdout
    failing = here(root, "tests_gpu", packages="bad")
    assert (
        failing.returncode == 1 and "bad              FAILED  0 passed, 1 failed" in failing.stdout
    )
    bench = here(root, "bench", "--full")
    assert bench.returncode == 0, bench.stdout + bench.stderr
    metrics = json.loads((root / "build/bench/core/metrics.json").read_text())
    assert metrics == {"command": "bench", "quick": False, "ratio": 0.5}
    assert "skipped: no python -m verger.a yet" in bench.stdout
    assert here(root, "report").returncode == 0
    assert "| `ratio` | 0.5 |" in (root / "build/report.md").read_text()


def test_unknown_package_lists_choices(make_workspace) -> None:
    root = make_workspace(Stub("shared/core"))
    proc = here(root, "bench", packages="core,nope")
    assert proc.returncode == 1 and "valid choices: core" in proc.stderr
