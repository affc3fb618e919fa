"""Decontamination (llm_platform/data/filters/decontam.py): the n-gram hashes and the matcher agree with a plain
reference (sets of lower-cased word tuples) on generated texts; casing and punctuation do not hide a passage, one
shorter than n is never flagged, the span is the longest overlapping run as the document writes it; the task texts
come from JSONL fields and from local lm-eval tasks; the config is checked naming its key; the dataset's fingerprint
follows the tasks' texts only when decontamination is on."""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_platform.config.data import DataConfig, DecontaminationConfig
from llm_platform.config.tokenizer import TokenizerConfig
from llm_platform.data import pipeline
from llm_platform.data.filters import decontam
from llm_platform.errors import ConfigError, DataError

HARNESS_TASKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "harness_tasks")
PASSAGE = "Scientists have studied the migration of birds for many years, and they still find surprising patterns."


def reference_grams(text: str, n: int) -> list[tuple[str, ...]]:
    w = re.findall(r"\w+", text.lower())
    return [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]


def reference(docs: list[str], tasks: dict[str, list[str]], n: int) -> list[tuple[int, str, int] | None]:
    """Per document: (its n-grams found in the best task, counted with repeats; the task) or None. The best task has
    the most, ties to the first name."""
    sets = {name: {g for t in texts for g in reference_grams(t, n)} for name, texts in tasks.items()}
    out: list[tuple[int, str, int] | None] = []
    for i, d in enumerate(docs):
        grams = reference_grams(d, n)
        best: tuple[int, str, int] | None = None
        for name in sorted(sets):
            count = sum(g in sets[name] for g in grams)
            if count and (best is None or count > best[2]):
                best = (i, name, count)
        out.append(best)
    return out


def matcher(tasks: dict[str, list[str]], n: int) -> decontam.Matcher:
    texts = [decontam.TaskText(name, name, tuple(t)) for name, t in tasks.items()]
    return decontam.Matcher(decontam.build_table(texts, n))


WORDS = st.sampled_from(["a", "b", "c", "The", "cat", "sat", "on", "mat", "Über", "x1", "İx"])  # İ lowers to 2 chars
SEPARATORS = st.sampled_from([" ", ", ", ". ", "\n", " -- ", "'"])


@st.composite
def texts(draw, max_words: int = 30) -> str:
    ws = draw(st.lists(WORDS, max_size=max_words))
    return "".join(w + draw(SEPARATORS) for w in ws)


@settings(max_examples=100, deadline=None)
@given(docs=st.lists(texts(), min_size=1, max_size=8), first=st.lists(texts(8), min_size=1, max_size=3),
       second=st.lists(texts(8), max_size=3), n=st.integers(1, 5))
def test_matcher_agrees_with_sets_of_word_tuples(docs, first, second, n):
    tasks = {"first": first, "second": second}
    m = matcher(tasks, n)
    want = reference(docs, tasks, n)
    assert m.contaminated(docs, n) == [w[0] for w in want if w]
    for doc, w in zip(docs, want):
        hit = m.hit(doc, n)
        assert (None if hit is None else (hit.task, hit.ngrams)) == (None if w is None else (w[1], w[2]))
        if hit is not None:  # the span's words are a run of the document's words, every n-gram of it in the task
            span = decontam.words(hit.span)
            assert len(span) >= n
            assert all(g in {g for t in tasks[hit.task] for g in reference_grams(t, n)}
                       for g in reference_grams(hit.span, n))


def test_a_recased_repunctuated_passage_is_found_with_its_longest_span():
    m = matcher({"gen": [PASSAGE]}, 13)
    doc = ("A story about SCIENTISTS who have studied the migration of birds -- for many years; AND they still find "
           "Surprising patterns! The end.")
    hit = m.hit(doc, 13)
    assert hit is not None
    assert (hit.task, hit.ngrams) == ("gen", 3)  # "have ... patterns": 15 of its words, 3 13-grams
    assert hit.span == "have studied the migration of birds -- for many years; AND they still find Surprising patterns"
    assert m.contaminated([doc, "nothing to see here", doc.lower()], 13) == [0, 2]


def test_a_passage_shorter_than_the_ngram_is_not_flagged():
    short = "the quick brown fox jumps over the lazy dog near the barn"  # 12 words
    m = matcher({"qa": [short]}, 13)
    assert m.all.size == 0
    assert m.contaminated([short, f"So {short} today."], 13) == []
    assert m.hit(short, 13) is None
    assert matcher({"qa": [short]}, 12).contaminated([f"So {short.upper()} today."], 12) == [0]


def test_table_round_trips_through_its_file(tmp_path):
    table = decontam.build_table([decontam.TaskText("gen", "g", (PASSAGE,)), decontam.TaskText("a/b é", "x", ("",))],
                                 3)
    uri = str(tmp_path / "decontam.npz")
    decontam.save_table(uri, table)
    got = decontam.load_table(uri)
    assert sorted(got) == ["a/b é", "gen"] and got["a/b é"].size == 0
    assert np.array_equal(got["gen"], table["gen"]) and got["gen"].dtype == np.uint64
    assert np.all(got["gen"][1:] > got["gen"][:-1]) and got["gen"].size == 14  # 16 words, all 3-grams differ


def test_ngram_hashes_ignore_case_punctuation_and_spacing():
    a = decontam.text_ngrams("The cat, sat on\nthe MAT!", 3)
    b = decontam.text_ngrams("the  cat sat -- on the mat", 3)
    assert a.dtype == np.uint64 and a.shape == (4,)
    assert np.array_equal(a, b)
    assert decontam.text_ngrams("two words", 3).size == 0


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_jsonl_sources_read_the_text_fields(tmp_path):
    uri = write_jsonl(tmp_path / "tasks.jsonl", [{"prompt": "p1", "references": ["r1", "r2"]},
                                                 {"prompt": "p2", "references": "r3", "label": 3}, {}])
    cfg = DecontaminationConfig(enabled=True, sources=[uri])
    assert decontam.read_sources(cfg) == [decontam.TaskText("tasks", uri, ("p1", "r1", "r2", "p2", "r3"))]
    other = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a", "prompt": "ignored"}])
    got = decontam.read_sources(replace(cfg, sources=[other], text_fields=["question", "answer"]))
    assert got[0].texts == ("q", "a")
    with pytest.raises(ConfigError, match="no file at"):
        decontam.read_sources(replace(cfg, sources=[str(tmp_path / "missing.jsonl")]))
    (tmp_path / "again").mkdir()
    twin = write_jsonl(tmp_path / "again" / "tasks.jsonl", [{"prompt": "p"}])
    with pytest.raises(ConfigError, match="both name a task 'tasks'"):
        decontam.read_sources(replace(cfg, sources=[uri, twin]))
    with pytest.raises(DataError, match="no text in fields"):
        decontam.read_sources(replace(cfg, sources=[uri], text_fields=["nothing"]))


def test_harness_tasks_from_a_local_task_folder(monkeypatch):
    pytest.importorskip("lm_eval")
    cfg = DecontaminationConfig(enabled=True, sources=["harness:llmp_choice", "harness:llmp_echo"],
                                harness_include_path=HARNESS_TASKS)
    decontam.check(cfg)
    got = {t.name: t for t in decontam.read_sources(cfg)}
    assert sorted(got) == ["llmp_choice", "llmp_echo"]
    assert got["llmp_echo"].source == "harness:llmp_echo"
    assert "the cat sat on the mat" in got["llmp_echo"].texts  # prompt and answer, one text
    assert "the cat sat on the river" in got["llmp_choice"].texts  # the labelled choice after the question
    assert "the tree" in got["llmp_choice"].texts  # every choice
    # An unknown name falls back to lm-eval's built-in index (40 s to build): here, as if it had none.
    import lm_eval.tasks

    real = lm_eval.tasks.TaskManager
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda include_path, include_defaults: real(
        include_path=include_path, include_defaults=False))
    with pytest.raises(ConfigError, match=r"no task harness:nope \(built-in or in .*harness_include_path="):
        decontam.read_sources(replace(cfg, sources=["harness:nope"]))


def test_config_is_checked_naming_the_key(monkeypatch):
    good = DecontaminationConfig(enabled=True, sources=["tasks.jsonl"])
    decontam.check(good)
    decontam.check(DecontaminationConfig(ngram=0))  # off: nothing to check
    with pytest.raises(ConfigError, match=r"data\.filters\.decontamination\.ngram=0"):
        decontam.check(replace(good, ngram=0))
    with pytest.raises(ConfigError, match=r"data\.filters\.decontamination\.sources is empty"):
        decontam.check(replace(good, sources=[]))
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the `harness` extra were not installed
    with pytest.raises(ConfigError, match=r"data\.filters\.decontamination\.sources.*llm-platform\[harness\]"):
        decontam.check(replace(good, sources=["harness:hellaswag"]))


def test_fingerprint_follows_the_tasks_only_when_on(tmp_path):
    uri = write_jsonl(tmp_path / "tasks.jsonl", [{"prompt": PASSAGE}])
    tok = TokenizerConfig()
    inputs = [{"uri": "c.jsonl", "size": 1, "marker": "m", "format": "jsonl"}]
    base = DataConfig()
    off = pipeline.fingerprint(base, tok, inputs)
    other_off = replace(base, filters=replace(base.filters, decontamination=DecontaminationConfig(sources=[uri])))
    assert pipeline.fingerprint(other_off, tok, inputs) == off  # off: the datasets built before it keep theirs
    on_cfg = replace(base, filters=replace(base.filters, decontamination=DecontaminationConfig(True, sources=[uri])))
    on = pipeline.fingerprint(on_cfg, tok, inputs)
    assert on != off
    listed = replace(on_cfg, filters=replace(on_cfg.filters, decontamination=replace(
        on_cfg.filters.decontamination, documents_reported=3)))
    assert pipeline.fingerprint(listed, tok, inputs) == on  # how many are listed changes no output
    (tmp_path / "elsewhere").mkdir()
    moved = write_jsonl(tmp_path / "elsewhere" / "tasks.jsonl", [{"prompt": PASSAGE}])
    renamed = replace(on_cfg, filters=replace(on_cfg.filters, decontamination=replace(
        on_cfg.filters.decontamination, sources=[moved])))
    assert pipeline.fingerprint(renamed, tok, inputs) == on  # the same task and texts, read from another path
    write_jsonl(tmp_path / "tasks.jsonl", [{"prompt": PASSAGE + " Again."}])
    assert pipeline.fingerprint(on_cfg, tok, inputs) != on  # the same file, edited
