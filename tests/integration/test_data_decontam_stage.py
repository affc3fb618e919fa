"""The data stage with decontamination on (`data.filters.decontamination`): an eval task's passage planted, recased and
repunctuated, in one document of a 20k-document corpus is found, dropped (mode drop) or kept and listed (mode report)
with its file, line and span; a task passage shorter than the n-gram is not; no other document is flagged (checked
against a plain reference over the whole corpus). Runs the real task code in process (`pipeline.in_process`)."""

from __future__ import annotations

import json
import re

from llm_platform.config import compose
from llm_platform.data import pipeline, sample

DOCUMENTS = 20_000
PLANTED_LINE = 12_346  # 1-based line of the document holding the passage
SHORT_LINE = 777
# Eval text of two task files: a 16-word prompt, and a 12-word one (under the 13-word n-gram).
PASSAGE = "Scientists have studied the migration of birds for many years, and they still find surprising patterns."
SHORT = "The quick brown fox jumps over the lazy dog near the barn."
PLANTED = "SCIENTISTS have studied the migration of birds -- for many years; and they still find Surprising patterns"


def write_corpus(tmp_path) -> tuple[str, str, list[str]]:
    docs = [d["text"] for d in sample.generate(DOCUMENTS, 0)]
    docs[PLANTED_LINE - 1] += f" Then the teacher read: {PLANTED}! Everyone listened."
    docs[SHORT_LINE - 1] += f" {SHORT.upper()}"
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    tasks = tmp_path / "eval"
    tasks.mkdir()
    (tasks / "gen.jsonl").write_text(json.dumps({"prompt": PASSAGE, "references": ["They fly south."]}) + "\n")
    (tasks / "qa.jsonl").write_text(json.dumps({"prompt": SHORT, "references": "A barn."}) + "\n")
    return str(corpus), str(tasks), docs


def reference_flagged(docs: list[str], task_texts: list[str], n: int) -> list[int]:
    """1-based lines of the documents sharing a word n-gram with a task text: sets of word tuples."""
    def grams(text: str) -> set[tuple[str, ...]]:
        w = re.findall(r"\w+", text.lower())
        return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}
    task = set().union(*(grams(t) for t in task_texts))
    return [i + 1 for i, d in enumerate(docs) if grams(d) & task]


def build(tmp_path, corpus: str, tasks: str, mode: str):
    root = str(tmp_path / f"store-{mode}")
    cfg = compose("data", ["debug=smoke", f"storage.root={root}", f"data.sources=[{corpus}]", "data.name=decontam",
                           "data.dedup.near=false", "data.seq_len=32", "tokenizer.vocab_size=300",
                           "tokenizer.max_training_documents=1000",
                           # ~1 MB units: the corpus is read in byte ranges, the planted line is in a later one
                           "data.task_target_bytes=1000000",
                           "data.filters.decontamination.enabled=true", f"data.filters.decontamination.mode={mode}",
                           f"data.filters.decontamination.sources=[{tasks}/gen.jsonl,{tasks}/qa.jsonl]"])
    return pipeline.build_dataset(cfg.data, cfg.tokenizer, root, progress=False, executor=pipeline.in_process)


def test_planted_passage_is_dropped_or_reported_with_its_span(tmp_path):
    corpus, tasks, docs = write_corpus(tmp_path)
    # The reference finds the planted document and nothing else: the sample corpus shares no 13-gram with the tasks.
    assert reference_flagged(docs, [PASSAGE, "They fly south.", SHORT, "A barn."], 13) == [PLANTED_LINE]

    dropped = build(tmp_path, corpus, tasks, "drop")
    reported = build(tmp_path, corpus, tasks, "report")
    listed = {"task": "gen", "source": corpus, "line": PLANTED_LINE, "ngrams": 16 - 13 + 1, "span": PLANTED}
    for result, mode in ((dropped, "drop"), (reported, "report")):
        d = result.manifest["decontamination"]
        assert (d["mode"], d["ngram"]) == (mode, 13)
        assert [t["name"] for t in d["tasks"]] == ["gen", "qa"]
        assert d["counts"] == {"decontamination.gen": 1}
        assert d["documents"] == [listed]
        assert "decontamination (13-grams, 2 tasks): 1 documents" in result.summary()

    m, r = dropped.manifest, reported.manifest
    assert m["counts"]["units"] > 1
    assert m["counts"]["dropped"]["decontamination.gen"] == 1
    assert m["dropped_by_file"][corpus]["decontamination.gen"] == 1
    assert [(e["line"], e["text"]) for e in m["filter_examples"]["decontamination.gen"]] == [(PLANTED_LINE, PLANTED)]
    assert not any(k.startswith("decontamination") for k in r["counts"]["dropped"])
    # Report mode keeps the document: one more trained on, everything else the same.
    assert r["counts"]["documents_kept"] == m["counts"]["documents_kept"] + 1
    assert r["counts"]["exact_duplicates"] == m["counts"]["exact_duplicates"]
    assert m["fingerprint"] != r["fingerprint"]
