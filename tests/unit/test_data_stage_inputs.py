"""The data stage on corpus shapes the fixtures of one large file never make, run in process (no Ray)."""

import json

from llm_platform.config import compose
from llm_platform.data import dedup, pipeline


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
