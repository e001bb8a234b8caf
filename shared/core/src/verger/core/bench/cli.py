"""The options every ``demo`` / ``bench`` command shares, so all packages spell them alike."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_cli_args(parser: argparse.ArgumentParser, *, default_out: str) -> argparse.ArgumentParser:
    """Add ``--out DIR``, ``--quick``, ``--device`` and ``--seed`` to ``parser``; returns it."""
    parser.add_argument(
        "--out", type=Path, default=Path(default_out), help=f"output folder (default {default_out})"
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes: finishes in < 2 minutes on 2 CPU cores"
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return parser
