"""The verger workspace members, read from their pyproject files (stdlib only).

One source of truth for the noxfile, ``ci/affected.py``, the docs generator and the release
helpers: a member is any ``shared/*`` or ``packages/*`` folder holding a ``pyproject.toml``.
Dependency edges come from each member's ``[project] dependencies`` that name another member.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MEMBER_GLOBS = ("shared/*/pyproject.toml", "packages/*/pyproject.toml")


@dataclass(frozen=True)
class Member:
    """One workspace member: where it lives and how it is named, imported and versioned."""

    short: str  # "core", "fast-attention": the session parameter and tag prefix
    dist: str  # "verger-core": the distribution name
    path: Path  # absolute folder
    rel: str  # folder relative to the workspace root, posix ("shared/core")
    module: str  # "verger.core"
    version: str
    description: str
    extras: tuple[str, ...]
    verger_deps: tuple[str, ...]  # distribution names of the members this one depends on
    requirements: tuple[str, ...] = ()  # the raw [project] dependencies

    @property
    def has_cli(self) -> bool:
        """Whether the member ships ``python -m verger.<name>`` (its ``__main__.py``)."""
        return (self.path / "src" / Path(*self.module.split(".")) / "__main__.py").is_file()


def requirement_name(requirement: str) -> str:
    """The normalized project name of a PEP 508 requirement string."""
    name = requirement
    for sep in "<>=!~;[ (@":
        name = name.split(sep, 1)[0]
    return name.strip().lower().replace("_", "-").replace(".", "-")


def read_member(pyproject: Path, root: Path = ROOT) -> Member:
    """Parse one member's pyproject.toml; raises ValueError if it is not a verger member."""
    try:
        meta = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
        dist = meta["name"]
    except (tomllib.TOMLDecodeError, KeyError) as exc:
        raise ValueError(f"{pyproject}: not a valid member pyproject ({exc})") from exc
    dist = requirement_name(dist)
    if not dist.startswith("verger-"):
        raise ValueError(f"{pyproject}: project name {dist!r} must start with 'verger-'")
    short = dist.removeprefix("verger-")
    if pyproject.parent.name != short:
        raise ValueError(
            f"{pyproject}: a member folder is named after its distribution: rename the folder "
            f"to {short!r} or the project to 'verger-{pyproject.parent.name}'"
        )
    deps = [requirement_name(d) for d in meta.get("dependencies", [])]
    return Member(
        short=short,
        dist=dist,
        path=pyproject.parent.resolve(),
        rel=pyproject.parent.resolve().relative_to(root.resolve()).as_posix(),
        module="verger." + short.replace("-", "_"),
        version=str(meta.get("version", "0")),
        description=str(meta.get("description", "")),
        extras=tuple(meta.get("optional-dependencies", {})),
        verger_deps=tuple(d for d in deps if d.startswith("verger-")),
        requirements=tuple(meta.get("dependencies", [])),
    )


def discover_members(root: Path = ROOT) -> list[Member]:
    """Every workspace member under ``root``: shared members first, then packages, by name."""
    found: list[Member] = []
    for pattern in MEMBER_GLOBS:
        found += [read_member(p, root) for p in sorted(root.glob(pattern))]
    return found


def closure(member: Member, members: Iterable[Member]) -> list[Member]:
    """The member and every member it depends on, transitively; dependencies come first."""
    by_dist = {m.dist: m for m in members}
    order: list[Member] = []

    def visit(m: Member, stack: tuple[str, ...]) -> None:
        for dep in m.verger_deps:
            if dep in stack:
                raise ValueError(f"dependency cycle: {' -> '.join((*stack, dep))}")
            if dep in by_dist and by_dist[dep] not in order:
                visit(by_dist[dep], (*stack, dep))
        if m not in order:
            order.append(m)

    visit(member, (member.dist,))
    return order


def dependents(selected: Iterable[Member], members: Iterable[Member]) -> list[Member]:
    """``selected`` plus every member that depends on one of them, transitively (input order)."""
    members = list(members)
    chosen = {m.dist for m in selected}
    changed = True
    while changed:
        changed = False
        for m in members:
            if m.dist not in chosen and chosen.intersection(m.verger_deps):
                chosen.add(m.dist)
                changed = True
    return [m for m in members if m.dist in chosen]


def version_key(version: str) -> tuple[int, ...]:
    """``"0.2"`` and ``"0.2.0"`` compare equal: release numbers padded to three parts."""
    parts = [int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


def floor(member: Member, dist: str) -> str | None:
    """The lowest version of ``dist`` that ``member`` allows (its ``>=`` bound), if any."""
    for raw in member.requirements:
        if requirement_name(raw) == dist:
            match = re.search(r">=\s*([0-9][0-9.]*)", raw)
            return match.group(1) if match else None
    return None
