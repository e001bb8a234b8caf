"""The Hugging Face datasets path, exercised on small local JSON Lines files (no network)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("datasets")

from verger.core.data import load_hf_dataset


def test_streaming_json_with_nested_domain_field(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    rows = [
        {"text": f"Pile-style document {i} about {src}. " * 5, "meta": {"pile_set_name": src}}
        for i in range(12)
        for src in ("ArXiv", "Github")
    ]
    rows.append(dict(rows[0]))  # an exact duplicate
    path = tmp_path / "shard.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    corpus = load_hf_dataset(
        "json", data_files=str(path), domain_field="meta.pile_set_name", validation_fraction=0.25
    )
    assert corpus.domains == ["ArXiv", "Github"]
    for domain in corpus.domains:
        docs = corpus.documents(domain, "train") + corpus.documents(domain, "validation")
        assert len(docs) == 12 and all(domain in d for d in docs)
        assert corpus.documents(domain, "validation")
    limited = load_hf_dataset("json", data_files=str(path), max_documents=5)
    assert limited.domains == ["default"]
    assert sum(len(limited.documents("default", s)) for s in ("train", "validation")) == 5
    with pytest.raises(KeyError, match=r"no field 'meta\.source'"):
        load_hf_dataset("json", data_files=str(path), domain_field="meta.source")
