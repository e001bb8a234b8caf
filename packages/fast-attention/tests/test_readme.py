"""The README's quickstart runs as written (that the files it links ship in the sdist is checked
for every member by the tooling test ``ci/tests/test_readme_links.py``)."""

from pathlib import Path

from verger.core.testing import run_readme_python

PACKAGE = Path(__file__).resolve().parents[1]


def test_readme_quickstart_runs(tmp_path):
    run_readme_python(PACKAGE / "README.md", cwd=tmp_path, timeout=300)
