"""Reading every supported format, and every kind of bad input named by file and line."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from llm_platform.data import sources
from llm_platform.errors import DataError

SPEC = sources.ReadSpec(kind="pretrain", text_field="text", prompt_field="prompt", response_field="response",
                        text_unit="file", max_record_bytes=1000, on_error="skip")


def read(path, spec=SPEC, fmt="auto"):
    inputs, missing = sources.list_inputs([str(path)], fmt)
    assert not missing, missing
    return [r for m in inputs for r in sources.read_file(m, 0, spec)]


def test_formats(tmp_path):
    lines = [json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3)]
    (tmp_path / "a.jsonl").write_text("".join(lines))
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress("".join(lines).encode()))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress("".join(lines).encode()))
    (tmp_path / "d.json").write_text(json.dumps([{"text": "x"}, {"text": "y"}]))
    pq.write_table(pa.table({"text": ["p1", "p2"], "other": [1, 2]}), tmp_path / "e.parquet")
    (tmp_path / "f.txt").write_text("whole file document\nsecond line\n")
    for name, n in [("a.jsonl", 3), ("b.jsonl.gz", 3), ("c.jsonl.zst", 3), ("d.json", 2), ("e.parquet", 2),
                    ("f.txt", 1)]:
        records = read(tmp_path / name)
        assert len(records) == n, name
        assert all(r["drop_reason"] == "" for r in records), name
    assert read(tmp_path / "c.jsonl.zst")[2]["text"] == "doc 2"
    assert read(tmp_path / "f.txt")[0]["text"].startswith("whole file")


def test_text_units(tmp_path):
    (tmp_path / "p.txt").write_text("para one\nstill one\n\npara two\n")
    spec = sources.ReadSpec(**{**SPEC.__dict__, "text_unit": "paragraph"})
    assert [r["text"] for r in read(tmp_path / "p.txt", spec)] == ["para one\nstill one\n", "para two\n"]
    spec = sources.ReadSpec(**{**SPEC.__dict__, "text_unit": "line"})
    assert len(read(tmp_path / "p.txt", spec)) == 3


def test_hf_saved_dataset(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["a b c", "d e f"]}).save_to_disk(str(tmp_path / "hf"))
    records = read(tmp_path / "hf")
    assert [r["text"] for r in records] == ["a b c", "d e f"]


def test_bad_records_are_named_and_nothing_valid_is_lost(tmp_path):
    body = b"".join([
        json.dumps({"text": "good one"}).encode() + b"\n",
        b"{not json\n",
        json.dumps({"body": "no text field"}).encode() + b"\n",
        b'{"text": "bad \xff\xfe utf8"}\n',
        json.dumps({"text": "x" * 2000}).encode() + b"\n",
        json.dumps({"text": 5}).encode() + b"\n",
        json.dumps({"text": "good two"}).encode() + b"\n",
    ])
    (tmp_path / "bad.jsonl").write_bytes(body)
    records = read(tmp_path / "bad.jsonl")
    reasons = {r["line"]: r["drop_reason"] for r in records}
    assert reasons == {1: "", 2: "malformed_json", 3: "missing_field", 4: "invalid_utf8", 5: "record_too_large",
                       6: "wrong_type", 7: ""}
    assert [r["text"] for r in records if not r["drop_reason"]] == ["good one", "good two"]
    assert all(r["source"].endswith("bad.jsonl") for r in records)


def test_on_error_fail_names_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    spec = sources.ReadSpec(**{**SPEC.__dict__, "on_error": "fail"})
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed_json"):
        read(tmp_path / "bad.jsonl", spec)


def test_truncated_gzip_keeps_what_was_read(tmp_path):
    data = gzip.compress("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(20000)).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    records = read(tmp_path / "cut.jsonl.gz")
    assert records[-1]["drop_reason"] == "corrupt_file"
    assert len(records) > 10 and all(r["drop_reason"] == "" for r in records[:-1])


def test_corrupt_parquet(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    records = read(tmp_path / "broken.parquet")
    assert len(records) == 1 and records[0]["drop_reason"] == "corrupt_file"


def test_missing_path_is_reported(tmp_path):
    inputs, missing = sources.list_inputs([str(tmp_path / "nope" / "*.jsonl"), str(tmp_path / "absent.jsonl")])
    assert inputs == [] and [m["reason"].split(":")[0] for m in missing] == ["missing_path", "missing_path"]


def test_supervised_fields(tmp_path):
    (tmp_path / "s.jsonl").write_text(json.dumps({"prompt": "Q?", "response": "A."}) + "\n" +
                                      json.dumps({"prompt": "Q?"}) + "\n")
    spec = sources.ReadSpec(**{**SPEC.__dict__, "kind": "sft"})
    records = read(tmp_path / "s.jsonl", spec)
    assert records[0]["prompt"] == "Q?" and records[0]["response"] == "A."
    assert records[1]["drop_reason"] == "missing_field" and "response" in records[1]["detail"]


def test_lines_over_the_limit_are_skipped_without_losing_neighbours(tmp_path):
    huge = json.dumps({"text": "y" * 5000}).encode()  # several reads' worth with a tiny limit
    (tmp_path / "h.jsonl").write_bytes(b'{"text": "before"}\n' + huge + b'\n{"text": "after"}')  # no final newline
    records = read(tmp_path / "h.jsonl")
    assert [(r["line"], r["drop_reason"], r["text"]) for r in records] == [
        (1, "", "before"), (2, "record_too_large", ""), (3, "", "after")]
