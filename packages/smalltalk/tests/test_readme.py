"""The README's quickstart runs as written (that its links ship in the sdist is checked for
every member by the tooling test ``ci/tests/test_readme_links.py``)."""

from __future__ import annotations

from pathlib import Path

from verger.core.testing import run_readme_python

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    # one thread: on 2 shared cores a second one only contends
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    proc = run_readme_python(README, cwd=tmp_path, timeout=600)
    assert "[0, 0, 2, 1, 1, 2]" in proc.stdout  # the optimal balanced assignment
    assert "routed perplexity" in proc.stdout
    assert (tmp_path / "toy-model" / "experts" / "expert-03").is_dir()
