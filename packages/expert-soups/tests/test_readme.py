"""The README's quickstart runs as written (that the files it links ship in the sdist is checked
for every member by the tooling test ``ci/tests/test_readme_links.py``)."""

from __future__ import annotations

from pathlib import Path

from verger.core.testing import run_readme_python

PACKAGE = Path(__file__).resolve().parents[1]
README = PACKAGE / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models on shared cores: one thread
    proc = run_readme_python(README, cwd=tmp_path, timeout=600)
    assert "soup loss" in proc.stdout
    assert (tmp_path / "docs-specialist" / "model.safetensors").is_file()
    assert (tmp_path / "docs-specialist" / "domain_weights.json").is_file()
