"""The options every ``demo`` / ``bench`` command shares, so all packages spell them alike.

Each option is checked as it is parsed: a bad value ends the command as a usage error (exit 2)
that names what was given and what is allowed, before any work starts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from verger.core.runtime import resolve_device


def output_folder(value: str) -> Path:
    """``--out``: a folder, created later if missing; an existing file is refused."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: is a file; give a folder (created if missing)")
    return path


def device_spec(value: str) -> str:
    """``--device``: kept as given (``auto`` stays ``auto``) once ``resolve_device`` accepts it
    here, so a malformed spec or a device this machine lacks is a usage error."""
    try:
        resolve_device(value)
    except (ValueError, RuntimeError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def seed_value(value: str) -> int:
    """``--seed``: an int in [0, 2**63) (what ``seed_everything`` takes)."""
    try:
        seed = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an int") from None
    if not 0 <= seed < 2**63:
        raise argparse.ArgumentTypeError(f"{seed} must be in [0, 2**63)")
    return seed


def positive_int(value: str) -> int:
    """An argparse type for counts and sizes: an int >= 1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an int") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{number} must be >= 1")
    return number


def add_cli_args(parser: argparse.ArgumentParser, *, default_out: str) -> argparse.ArgumentParser:
    """Add ``--out DIR``, ``--quick``, ``--device`` and ``--seed`` to ``parser``; returns it."""
    parser.add_argument(
        "--out",
        type=output_folder,
        default=Path(default_out),
        help=f"output folder (default {default_out})",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes: finishes in < 2 minutes on 2 CPU cores"
    )
    parser.add_argument(
        "--device", type=device_spec, default="auto", help="auto | cpu | cuda | cuda:N | mps"
    )
    parser.add_argument("--seed", type=seed_value, default=0, help="random seed (default 0)")
    return parser
