"""Run records: parsing with clear errors, torn and malformed runs.jsonl lines."""

import json

import pytest

from verger.qat_scaling import RecordError, append_record, parse_records, read_records

GOOD = dict(n_params=1e5, tokens=1e6, qat_fraction=0.3, bits=4, val_loss=3.1)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(bits=5), "bits=5"),
        (dict(bits=True), "bits=True"),
        (dict(qat_fraction=1.5), r"qat_fraction=1.5 must be in \[0, 1\]"),
        (dict(qat_fraction=-0.1), "qat_fraction"),
        (dict(val_loss=float("nan")), "val_loss=nan"),
        (dict(val_loss="3.1"), "val_loss"),
        (dict(n_params=0), "n_params=0 must be a finite number > 0"),
        (dict(tokens=-5), "tokens"),
        (dict(bits=None), "full-precision run"),
    ],
)
def test_malformed_records_are_named(change, match):
    with pytest.raises(RecordError, match=match):
        parse_records([GOOD, {**GOOD, **change}])


def test_missing_fields_empty_lists_and_non_objects():
    with pytest.raises(RecordError, match=r"record 0: missing field\(s\) \['val_loss'\]"):
        parse_records([{k: v for k, v in GOOD.items() if k != "val_loss"}])
    with pytest.raises(RecordError, match="no records"):
        parse_records([])
    with pytest.raises(RecordError, match="JSON object"):
        parse_records([[1, 2]])
    fp = parse_records([dict(GOOD, bits=None, qat_fraction=0.0)])[0]
    assert fp.is_fp and fp.effective_bits is None


def test_runs_jsonl_torn_tail_is_skipped_and_cut_before_appending(tmp_path):
    path = tmp_path / "runs.jsonl"
    append_record(path, dict(GOOD, run_id="a"))
    with open(path, "a") as f:
        f.write('{"run_id": "b", "n_par')  # a writer killed mid-line
    assert [r["run_id"] for r in read_records(path)] == ["a"]
    append_record(path, dict(GOOD, run_id="c"))
    assert [r["run_id"] for r in read_records(path)] == ["a", "c"]
    assert path.read_text().count("\n") == 2


def test_a_malformed_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps(GOOD) + "\nnot json\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(RecordError, match=r"runs.jsonl:2: not JSON"):
        read_records(path)
    path.write_text("[1]\n")
    with pytest.raises(RecordError, match="JSON object"):
        read_records(path)
    with pytest.raises(RecordError, match="does not exist"):
        read_records(tmp_path / "missing.jsonl")
