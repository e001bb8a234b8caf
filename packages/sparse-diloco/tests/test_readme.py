"""The README's quickstart runs as written (that the files it links ship in the sdist is checked for
every member by the tooling test ``ci/tests/test_readme_links.py``)."""

import re
from pathlib import Path

from verger.core.testing import run_readme_python

PACKAGE = Path(__file__).resolve().parents[1]
README = PACKAGE / "README.md"


def test_readme_python_blocks_run(tmp_path):
    """The quickstart used to name undefined `model` and `my_batches`, and its loss_fn
    `m(*b)` returned core's LMOutput, not a loss."""
    proc = run_readme_python(README, cwd=tmp_path, timeout=600)
    losses = re.search(r"inner loss ([\d.]+) -> ([\d.]+)", proc.stdout)
    assert losses and float(losses.group(2)) < float(losses.group(1))  # it trains
    assert "% of the model trained per worker" in proc.stdout
