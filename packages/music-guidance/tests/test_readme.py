"""The README's quickstart runs as written."""

from pathlib import Path

from verger.core.testing import run_readme_python

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_runs(tmp_path):
    run_readme_python(README, cwd=tmp_path, timeout=600)
