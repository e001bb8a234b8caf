"""The README's runnable python blocks run as written (reference snippets are marked)."""

from __future__ import annotations

from pathlib import Path

from verger.core.testing import readme_python_blocks, run_readme_python

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_runs(tmp_path) -> None:
    assert len(readme_python_blocks(README)) >= 3
    run_readme_python(README, cwd=tmp_path)
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()  # the LM block saved its model


def test_blocks_marked_not_run_are_left_out(tmp_path) -> None:
    doc = tmp_path / "R.md"
    doc.write_text("```python\nx = 1\n```\n<!-- not run -->\n```python\nboom()\n```\n")
    assert readme_python_blocks(doc) == ["x = 1\n"]
    run_readme_python(doc, cwd=tmp_path)
