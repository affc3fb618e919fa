"""The data stage on corpus shapes the fixtures of one large file never make, run in process (no Ray)."""

import json

from llm_platform.config import compose
from llm_platform.data import dedup, pipeline
from llm_platform.data.units import plan_units


def _docs_in_split(split: str, n: int, val_fraction: float) -> list[str]:
    docs, i = [], 0
    while len(docs) < n:
        text = f"Document number {i} tells a short story about a lighthouse keeper and the sea at night."
        if dedup.split_of(dedup.text_hash(text), val_fraction) == split:
            docs.append(text)
        i += 1
    return docs


def test_a_file_whose_documents_all_land_in_val(tmp_path, monkeypatch):
    """A small file whose kept documents are all validation documents gives the tokenizer sample nothing from it:
    that crashed the tokenizer phase (pyarrow's take of an empty Python list) on a real corpus of small files."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in _docs_in_split("train", 30, 0.2)))
    (tmp_path / "corpus" / "b.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in _docs_in_split("val", 3, 0.2)))
    cfg = compose("data", ["debug=smoke", "data.sources=[corpus]", "data.val_fraction=0.2", "data.seq_len=16"])
    result = pipeline.build_dataset(cfg.data, cfg.tokenizer, cfg.storage.root, executor=pipeline.in_process)
    m = result.manifest
    assert m["counts"]["documents_kept"] == 33
    assert m["splits"]["val"]["documents"] == 3 and m["splits"]["train"]["documents"] == 30


def test_units_are_consecutive_runs_of_about_the_target_size():
    from hypothesis import given
    from hypothesis import strategies as st

    @given(st.lists(st.integers(0, 5_000), max_size=300), st.integers(1, 20_000), st.integers(1, 40))
    def check(sizes, target, min_units):
        units = plan_units(sizes, target, min_units)
        assert [i for u in units for i in u] == list(range(len(sizes)))  # every file once, in order
        assert all(u == list(range(u[0], u[-1] + 1)) for u in units)  # consecutive files
        assert len(units) >= min(len(sizes), min_units)
        if sizes:
            share = max(1.0, sum(sizes) / max(-(-sum(sizes) // target), min(len(sizes), min_units)))
            assert all(len(u) == 1 or sum(sizes[i] for i in u) <= share for u in units)  # a file alone, or a share

    check()


def test_the_grouping_of_files_into_tasks_changes_no_output(tmp_path, monkeypatch):
    """Many small files (some empty, one whose documents are all validation documents, duplicates across files)
    give byte-identical shards and the same counts with a file or two a task and with a few tasks for them all."""
    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = _docs_in_split("train", 60, 0.1) + _docs_in_split("val", 8, 0.1)
    for i in range(40):
        lines = docs[i * 2:i * 2 + 3] if i % 7 else []  # overlapping slices: each file repeats one of the last
        (corpus / f"f{i:03d}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    outputs = []
    for target in (600, 1 << 30):  # files of at most 3 documents: 600 bytes keeps them whole, two or so a unit
        cfg = compose("data", ["debug=smoke", "data.sources=[corpus]", "data.val_fraction=0.1", "data.seq_len=16",
                               f"data.task_target_bytes={target}", f"storage.root=store-{target}"])
        m = pipeline.build_dataset(cfg.data, cfg.tokenizer, cfg.storage.root, executor=pipeline.in_process).manifest
        out = tmp_path / f"store-{target}" / "datasets" / m["name"] / m["fingerprint"]
        shards = {f: (out / f).read_bytes() for s in ("train", "val") for f in m["splits"][s]["files"]}
        outputs.append((m["counts"], m["splits"], shards))
    (counts_a, splits_a, shards_a), (counts_b, splits_b, shards_b) = outputs
    assert counts_a.pop("units") >= 12 and counts_b.pop("units") <= 4
    assert counts_a == counts_b and splits_a == splits_b and shards_a == shards_b
    assert counts_a["exact_duplicates"] > 0 and splits_a["val"]["documents"] > 0


def test_byte_ranges_of_a_file_read_every_line_exactly_once():
    """`pieces` cuts a large line-based file into byte ranges read by different tasks: a line belongs to the range
    its first byte is in, so the ranges' lines, one after the other, are the file's lines."""
    import io

    from hypothesis import given
    from hypothesis import strategies as st

    from llm_platform.data.readers import LinesOfRange

    line = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"") + b"\n")

    @given(st.lists(line, max_size=40), st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"")),
           st.integers(1, 120))
    def check(lines, tail, piece):
        data = b"".join(lines) + tail  # a last line with or without its newline
        parts = []
        for start in range(0, len(data), piece):
            reader, part = LinesOfRange(io.BytesIO(data), start, min(len(data), start + piece)), b""
            while chunk := reader.read():
                part += chunk
            parts.append(part)
        assert b"".join(parts) == data
        owned = [p for p in parts if p]
        assert all(p.endswith(b"\n") for p in owned[:-1])  # whole lines only: a range ends where a line does

    check()


def test_a_large_line_file_split_into_ranges_gives_the_output_of_one_read(tmp_path, monkeypatch):
    """A JSONL file and a one-document-a-line text file, larger than a task's share, are read in byte ranges by
    several units: the same shards, counts and dropped records as reading each file whole."""
    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = _docs_in_split("train", 150, 0.1) + _docs_in_split("val", 20, 0.1)
    lines = [json.dumps({"text": t}) for t in docs] + ["{broken", json.dumps({"body": "no text field"})]
    lines[5:5] = [lines[40], ""]  # an exact duplicate across ranges, and a blank line
    (corpus / "big.jsonl").write_text("\n".join(sorted(lines, key=len)) + "\n")
    outputs = []
    for target in (1500, 1 << 30):
        cfg = compose("data", ["debug=smoke", "data.sources=[corpus]", "data.val_fraction=0.1", "data.seq_len=16",
                               f"data.task_target_bytes={target}", f"storage.root=store-{target}"])
        m = pipeline.build_dataset(cfg.data, cfg.tokenizer, cfg.storage.root, executor=pipeline.in_process).manifest
        out = tmp_path / f"store-{target}" / "datasets" / m["name"] / m["fingerprint"]
        shards = {f: (out / f).read_bytes() for s in ("train", "val") for f in m["splits"][s]["files"]}
        outputs.append((m["counts"], m["splits"], shards, [r["reason"] for r in m["skipped"]]))
    (counts_a, splits_a, shards_a, skipped_a), (counts_b, splits_b, shards_b, skipped_b) = outputs
    assert counts_a.pop("units") > 10 and counts_b.pop("units") == 1
    assert counts_a == counts_b and splits_a == splits_b and shards_a == shards_b and skipped_a == skipped_b
    assert counts_a["records_in"] == len(lines) - 1 and counts_a["exact_duplicates"] == 1
    assert counts_a["dropped"] == {"malformed_json": 1, "missing_field": 1}


def test_the_same_files_named_otherwise_are_the_same_dataset(tmp_path, monkeypatch):
    """The fingerprint holds the files listed (URI, size, marker), not the patterns that named them: sources given
    in another order, or as a folder instead of files, find the finished dataset instead of building it again."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    for name, docs in (("a.jsonl", _docs_in_split("train", 12, 0.1)), ("b.jsonl", _docs_in_split("val", 3, 0.1))):
        (tmp_path / "corpus" / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    results = []
    for sources in ("[corpus/a.jsonl,corpus/b.jsonl]", "[corpus/b.jsonl,corpus/a.jsonl]", "[corpus]"):
        cfg = compose("data", ["debug=smoke", f"data.sources={sources}", "data.val_fraction=0.1"])
        results.append(pipeline.build_dataset(cfg.data, cfg.tokenizer, cfg.storage.root,
                                              executor=pipeline.in_process))
    assert [r.reused for r in results] == [False, True, True]
    assert len({r.uri for r in results}) == 1
