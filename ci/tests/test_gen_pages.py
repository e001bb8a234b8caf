"""docs/gen_pages.py: pages from READMEs and metrics, with links valid for mkdocs --strict."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from stubs import PNG, REPO, Stub

README = """\
# verger-a

See the [changelog](CHANGELOG.md), [core](../../shared/core/README.md#install),
[the bench script](benchmarks/run.py), [a folder](src/), [home](../../README.md),
[contributing](../../docs/contributing.md), [web](https://example.com/x.md), [top](#verger-a).

![curve](docs/curve.png)

[ref]: CHANGELOG.md
<img src="docs/curve.png" width="10">

```python
y = layers[0](x)  # [not](a-link.md)
```

Inline `blocks[1](h)` stays code.
"""


def load_gen_pages(root: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gen_pages_under_test", root / "docs/gen_pages.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_member_readme_links_are_rewritten(make_workspace) -> None:
    root = make_workspace(Stub("shared/core"), Stub("packages/a", readme=README))
    (root / "packages/a/docs").mkdir()
    (root / "packages/a/docs/curve.png").write_bytes(PNG)
    (root / "packages/a/benchmarks").mkdir()
    (root / "packages/a/benchmarks/run.py").write_text("")
    gen = load_gen_pages(root)
    files = gen.Site(root, repo_url="https://github.com/o/r").build()
    page = files["packages/a/index.md"]
    assert "[changelog](changelog.md)" in page
    assert "[core](../core/index.md#install)" in page
    assert (
        "[the bench script](https://github.com/o/r/blob/main/packages/a/benchmarks/run.py)" in page
    )
    assert "[a folder](https://github.com/o/r/tree/main/packages/a/src)" in page
    assert "[home](../../index.md)" in page
    assert "[contributing](../../contributing.md)" in page
    assert "(https://example.com/x.md)" in page and "[top](#verger-a)" in page
    assert "![curve](../../assets/packages/a/docs/curve.png)" in page
    assert "[ref]: changelog.md" in page
    assert '<img src="../../assets/packages/a/docs/curve.png"' in page
    assert files["assets/packages/a/docs/curve.png"] == PNG
    assert "y = layers[0](x)  # [not](a-link.md)" in page and "`blocks[1](h)`" in page


def test_site_structure_and_fallbacks(make_workspace) -> None:
    root = make_workspace(Stub("shared/core", main=True), Stub("packages/b", changelog=None))
    files = load_gen_pages(root).Site(root).build()
    assert "no README yet" in files["packages/b/index.md"]
    assert "No CHANGELOG.md yet" in files["packages/b/changelog.md"]
    assert "[verger-b](b/index.md)" in files["packages/index.md"]
    nav = files["SUMMARY.md"]
    assert nav.index("[Overview](index.md)") < nav.index("packages/core/index.md")
    assert nav.index("packages/b/index.md") < nav.index("[Results](results.md)")
    assert "[Contributing](contributing.md)" in nav
    # The root README's link to the core folder becomes the core's page.
    assert "(packages/core/index.md)" in files["index.md"]
    results = files["results.md"]
    assert '`uvx nox -s "demo(core)"`' in results  # has a CLI, never run
    assert "no `python -m verger.b` command yet" in results


def test_results_page_copies_plots(make_workspace) -> None:
    root = make_workspace(Stub("shared/core", main=True))
    run = root / "build/demo/core"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text('{"ratio": 0.5}')
    (run / "curve.png").write_bytes(PNG)
    files = load_gen_pages(root).Site(root).build()
    assert "| `ratio` | 0.5 |" in files["results.md"]
    assert "(results/demo/core/curve.png)" in files["results.md"]
    assert files["results/demo/core/curve.png"] == PNG


def test_the_real_readme_keeps_its_two_commands() -> None:
    text = (REPO / "README.md").read_text()
    assert "uvx nox -s demo" in text and "uvx nox -s tests" in text
