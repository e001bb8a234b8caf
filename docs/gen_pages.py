"""Generate the docs pages from the repository (run by mkdocs-gen-files at `mkdocs build`).

- ``index.md``: the root README.md (one source for the overview and the package table);
- ``packages/index.md``: every member with its version and description;
- ``packages/<name>/index.md`` and ``changelog.md``: each member's README.md and CHANGELOG.md;
- ``results.md``: the members' build/{demo,bench}/<name>/metrics.json with their plots;
- ``SUMMARY.md``: the navigation (mkdocs-literate-nav).

Relative links in the copied Markdown are rewritten so ``mkdocs build --strict`` passes: links
to a member's README/CHANGELOG, to docs pages or to the root README go to the matching page,
images are copied into the site, and anything else points at the file on GitHub.
"""

from __future__ import annotations

import importlib.util
import posixpath
import re
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
REPO_URL = "https://github.com/verger-ml/verger"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp"}
HAND_WRITTEN = ("contributing.md",)  # pages kept as files in docs/

# [text](target "title") and ![alt](target); reference definitions "[id]: target"; src="..."
INLINE = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)((?:\s+\"[^\"]*\")?\))")
REFERENCE = re.compile(r"^(\s*\[[^\]]+\]:\s*)(\S+)", re.MULTILINE)
HTML_SRC = re.compile(r"((?:src|href)=\")([^\"]+)(\")")
CODE = re.compile(
    r"(^ {0,3}(?:```|~~~).*?^ {0,3}(?:```|~~~)[ \t]*$|`[^`\n]+`)", re.MULTILINE | re.DOTALL
)


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"verger_ci_{name}", ROOT / "ci" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class Site:
    """The generated pages of one repository: docs path -> text or bytes."""

    def __init__(self, root: Path = ROOT, repo_url: str = REPO_URL) -> None:
        self.root = root.resolve()
        self.repo_url = repo_url.rstrip("/")
        self.workspace = _load("workspace")
        self.results = _load("results")
        self.members = self.workspace.discover_members(self.root)
        self.files: dict[str, str | bytes] = {}

    def page_of(self, target: Path) -> str | None:
        """The docs path that stands for the repository file or folder ``target``, if any."""
        for m in self.members:
            if target in (m.path, m.path / "README.md"):
                return f"packages/{m.short}/index.md"
            if target == m.path / "CHANGELOG.md":
                return f"packages/{m.short}/changelog.md"
        if target == self.root / "README.md":
            return "index.md"
        docs = self.root / "docs"
        if target.suffix == ".md" and target.is_relative_to(docs) and target.is_file():
            return target.relative_to(docs).as_posix()
        if target == docs:
            return "index.md"
        return None

    def link(self, raw: str, source_dir: Path, page: str) -> str:
        """``raw``, a link found in a file of ``source_dir``, as seen from the page ``page``."""
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^#|^/", raw):
            return raw  # absolute URL, anchor or site-absolute path
        path, _, fragment = raw.partition("#")
        fragment = "#" + fragment if fragment else ""
        target = (source_dir / path).resolve()
        docs_path = self.page_of(target)
        is_image = target.suffix.lower() in IMAGE_SUFFIXES and target.is_file()
        if docs_path is None and is_image and target.is_relative_to(self.root):
            docs_path = "assets/" + target.relative_to(self.root).as_posix()
            self.files[docs_path] = target.read_bytes()
        if docs_path is not None:
            rel = posixpath.relpath(docs_path, posixpath.dirname(page) or ".")
            return rel + fragment
        if target.is_relative_to(self.root):
            kind = "tree" if target.is_dir() else "blob"
            return (
                f"{self.repo_url}/{kind}/main/{target.relative_to(self.root).as_posix()}{fragment}"
            )
        return raw

    def rewrite(self, text: str, source_dir: Path, page: str) -> str:
        """Every relative link of a Markdown text made valid for the page ``page``."""

        def sub(match: re.Match[str]) -> str:
            return match[1] + self.link(match[2], source_dir, page) + match[3]

        def prose(part: str) -> str:
            part = INLINE.sub(sub, part)
            part = REFERENCE.sub(lambda m: m[1] + self.link(m[2], source_dir, page), part)
            return HTML_SRC.sub(sub, part)

        # Code (fenced blocks, inline spans) keeps its text: `layers[0](x)` is not a link.
        parts = CODE.split(text)
        return "".join(part if i % 2 else prose(part) for i, part in enumerate(parts))

    def copy_markdown(self, source: Path, page: str, fallback: str) -> None:
        text = source.read_text(encoding="utf-8") if source.is_file() else fallback
        self.files[page] = self.rewrite(text, source.parent, page)

    def build(self) -> dict[str, str | bytes]:
        """Every generated page (and copied image), keyed by its path under the docs root."""
        self.copy_markdown(self.root / "README.md", "index.md", "# verger\n")
        table = [
            "# Packages",
            "",
            "| package | version | import | what it gives |",
            "|---|---|---|---|",
        ]
        nav = ["* [Overview](index.md)", "* Packages", "    * [All packages](packages/index.md)"]
        for m in self.members:
            base = f"packages/{m.short}"
            table.append(
                f"| [{m.dist}]({m.short}/index.md) | {m.version} | `{m.module}` | {m.description} |"
            )
            self.copy_markdown(
                m.path / "README.md",
                f"{base}/index.md",
                f"# {m.dist}\n\n{m.description}\n\nThis package has no README yet.\n",
            )
            self.copy_markdown(
                m.path / "CHANGELOG.md",
                f"{base}/changelog.md",
                f"# Changelog: {m.dist}\n\nNo CHANGELOG.md yet.\n",
            )
            nav += [
                f"    * {m.short}",
                f"        * [README]({base}/index.md)",
                f"        * [Changelog]({base}/changelog.md)",
            ]
        self.files["packages/index.md"] = "\n".join(table) + "\n"
        self.files["results.md"] = self.results_page()
        nav.append("* [Results](results.md)")
        nav += [f"* [{p.removesuffix('.md').title()}]({p})" for p in HAND_WRITTEN]
        self.files["SUMMARY.md"] = "\n".join(nav) + "\n"
        return self.files

    def results_page(self) -> str:
        build = self.root / "build"

        def asset(path: Path) -> str | None:
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                return None  # a run's report.md may link files that are not copied
            docs_path = "results/" + path.relative_to(build).as_posix()
            self.files[docs_path] = path.read_bytes()
            return posixpath.relpath(docs_path, ".")

        pending = {
            m.short: f"no `python -m {m.module}` command yet" for m in self.members if not m.has_cli
        }
        names = [m.short for m in self.members]
        text, _ = self.results.render(names, build, title="Results", asset=asset, pending=pending)
        return text


def main() -> None:
    import mkdocs_gen_files

    for path, content in Site().build().items():
        mode = "wb" if isinstance(content, bytes) else "w"
        with mkdocs_gen_files.open(path, mode) as handle:
            handle.write(content)


if __name__ in ("__main__", "<run_path>"):
    main()
