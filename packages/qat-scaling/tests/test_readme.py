"""The README's quickstart runs as written (that the files it links ship in the sdist is checked for
every member by the tooling test ``ci/tests/test_readme_links.py``)."""

from __future__ import annotations

from pathlib import Path

from verger.core.testing import run_readme_python

PACKAGE = Path(__file__).resolve().parents[1]
README = PACKAGE / "README.md"


def test_readme_python_blocks_run(tmp_path):
    # a fresh process trains five tiny runs and fits a law: ~15 s of CPU
    proc = run_readme_python(README, cwd=tmp_path, timeout=600)
    assert "0.38" in proc.stdout  # f*(1000) with the paper's constant
    assert (tmp_path / "model-4bit" / "quantization.json").is_file()
    assert (tmp_path / "runs" / "qat-sweep" / "runs.jsonl").is_file()
