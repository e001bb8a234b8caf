"""The README's quickstart runs as written (in a fresh process, on a fresh data cache)."""

from __future__ import annotations

from pathlib import Path

from verger.core.testing import run_readme_python

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # small models on shared cores: one thread
    monkeypatch.setenv("VERGER_DATA", str(tmp_path / "data"))
    proc = run_readme_python(README, cwd=tmp_path, timeout=600)
    assert "'parts_used'" in proc.stdout
    assert (tmp_path / "shape.ply").stat().st_size > 0
    assert any((tmp_path / "data" / "neural-parts").iterdir())  # the cache went where asked
