#!/usr/bin/env python3
"""Import one module from an installed wheel and prove nothing else of verger came with it.

    python ci/import_check.py verger.maeclip --absent verger.fast_attention verger.smalltalk

Run by the ``build`` and ``release`` nox sessions from a temporary folder (so the checkout is
not importable): fails if the module is not imported from site-packages, or if any module
named after ``--absent`` can be found (installed without being asked for).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", help="the module the wheel provides, e.g. verger.core")
    parser.add_argument("--absent", nargs="*", default=[], help="modules that must not be found")
    args = parser.parse_args(argv)
    module = importlib.import_module(args.module)
    where = getattr(module, "__file__", None) or ""
    if "site-packages" not in where:
        print(
            f"import_check: {args.module} came from {where!r}, not site-packages", file=sys.stderr
        )
        return 1
    leaked = [m for m in args.absent if importlib.util.find_spec(m) is not None]
    if leaked:
        print(f"import_check: installed but not asked for: {leaked}", file=sys.stderr)
        return 1
    print(f"ok: {args.module} imports alone from {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
