"""The data stage with a published rule set and a language filter (`data/filters=gopher`, `data.languages=[en]`) on a
mixed-language corpus: the manifest counts each drop per rule and per file, lists the first dropped documents of each
rule, counts the languages, the cleaned documents carry their language, and the console report shows it all. Runs the
real task code in process (`pipeline.in_process`, no Ray: the property tests show it builds what Ray builds)."""

from __future__ import annotations

import glob
import json
import os

import pyarrow.parquet as pq

from llm_platform import storage
from llm_platform.config import compose
from llm_platform.data import pipeline

ENGLISH = [
    "The river runs past the old mill and through the village, where children play on its banks in the summer. "
    "Farmers bring their grain to the market every week, and the baker sells fresh bread to anyone who comes early. "
    "In the evening the lamps are lit along the main street, and people gather to talk about the weather, the "
    "harvest and the news that travellers carry with them from the city beyond the hills.",
    "Scientists have studied the migration of birds for many years, and they still find surprising patterns. Some "
    "species fly thousands of kilometres without stopping, guided by the stars, the sun and the magnetic field of "
    "the earth. Young birds that have never made the journey seem to know the route, which suggests that part of "
    "the knowledge is inherited rather than learned from older members of the flock.",
    "A good recipe for soup starts with a simple stock made from vegetables, herbs and a little salt. Let it simmer "
    "slowly for an hour so that the flavours can develop, then strain it and add whatever you have to hand: beans, "
    "potatoes, carrots or leftover rice. Serve it hot with bread and butter, and keep the rest in a cold place for "
    "the next day, when it often tastes even better than before.",
    "The library opened its doors to the public more than a century ago, and it has grown with the town ever since. "
    "Its reading rooms are quiet in the morning, busy after school and almost empty late at night. Volunteers help "
    "visitors find old maps, letters and newspapers, and every spring they organise a sale of donated books to raise "
    "money for repairs to the roof and the heating.",
    "Learning to play an instrument takes patience, because progress is slow at first and practice can feel "
    "repetitive. Teachers often advise students to play a little every day instead of for many hours once a week. "
    "Over time the fingers learn the shapes of chords and scales, the ear learns to hear mistakes, and the music "
    "begins to sound like something that the player has chosen to say.",
]
GERMAN = ["Der Fluss fließt am alten Mühlrad vorbei und durch das Dorf, wo die Kinder im Sommer am Ufer spielen.",
          "Die Bibliothek wurde vor mehr als hundert Jahren eröffnet und ist seitdem mit der Stadt gewachsen."]
FRENCH = "La rivière passe devant le vieux moulin et traverse le village, où les enfants jouent en été."
SPANISH = "El río pasa junto al viejo molino y atraviesa el pueblo, donde los niños juegan en verano."
ITALIAN = "Il fiume scorre accanto al vecchio mulino e attraversa il villaggio, dove i bambini giocano d'estate."
# 43 words: under Gopher's 50, and long enough that no single 4-gram is 16% of it (a short text is caught by the
# most-frequent-n-gram rules first, as in datatrove, since each n-gram there counts even when it appears once).
SHORT = ("Rain fell on the roof of the old barn while the horses waited inside for the storm to pass. The farmer "
         "checked the doors twice, lit a small lamp and sat down on a bale of straw to listen to the wind outside.")
REPEATED = "\n\n".join(["Buy the best shoes in the city at our store today."] * 6 + [ENGLISH[0]])
BULLETS = "\n".join("- " + s.strip() + "." for s in (ENGLISH[1] + " " + ENGLISH[3]).split(". ") if s.strip())


def write_jsonl(path: str, texts: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)


def test_gopher_and_language_filters_report_per_rule_and_file(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    a = [ENGLISH[0], GERMAN[0], ENGLISH[1], SHORT, FRENCH, REPEATED, ENGLISH[2], SPANISH]
    b = [ENGLISH[3], ITALIAN, BULLETS, ENGLISH[4], GERMAN[1]]
    write_jsonl(str(corpus / "a.jsonl"), a)
    write_jsonl(str(corpus / "b.jsonl"), b)
    root = str(tmp_path / "store")
    cfg = compose("data", ["debug=smoke", f"storage.root={root}", f"data.sources=[{corpus}]", "data.name=filtered",
                           "data/filters=gopher", "data.languages=[en]", "data.dedup.exact=false",
                           "data.dedup.near=false", "data.seq_len=32"])
    deleted: list[str] = []
    monkeypatch.setattr(storage, "delete", deleted.append)  # keep _work/ to read the cleaned documents
    result = pipeline.build_dataset(cfg.data, cfg.tokenizer, root, progress=False, executor=pipeline.in_process)
    m = result.manifest
    src_a, src_b = (os.path.join(str(corpus), n) for n in ("a.jsonl", "b.jsonl"))
    counts = m["counts"]
    assert counts["records_in"] == 13
    assert counts["dropped"] == {"language.not_listed": 5, "gopher_quality.min_words": 1,
                                 "gopher_repetition.dup_para_frac": 1, "gopher_quality.bullet_lines": 1}
    assert m["dropped_by_file"] == {
        src_a: {"language.not_listed": 3, "gopher_quality.min_words": 1, "gopher_repetition.dup_para_frac": 1},
        src_b: {"language.not_listed": 2, "gopher_quality.bullet_lines": 1}}
    assert counts["languages"] == {"detected": {"en": 8, "de": 2, "fr": 1, "es": 1, "it": 1}, "kept": {"en": 5}}
    assert counts["documents_kept"] == 5
    # The first three of a reason in file order, with the start of their text.
    examples = m["filter_examples"]
    assert [(e["source"], e["line"]) for e in examples["language.not_listed"]] == [(src_a, 2), (src_a, 5),
                                                                                   (src_a, 8)]
    assert examples["language.not_listed"][0]["text"] == GERMAN[0][:200]
    assert [e["language"] for e in examples["language.not_listed"]] == ["de", "fr", "es"]
    assert [(e["source"], e["line"], e["text"]) for e in examples["gopher_quality.min_words"]] == [
        (src_a, 4, SHORT[:200])]
    assert examples["gopher_quality.bullet_lines"][0]["text"] == BULLETS[:200]
    assert set(examples) == set(counts["dropped"])
    # The cleaned documents keep their language for a later stage (mixtures).
    work = next(d for d in deleted if d.endswith("_work"))
    tables = [pq.read_table(p) for p in sorted(glob.glob(os.path.join(work, "clean", "*.parquet")))]
    assert [lang for t in tables for lang in t.column("language").to_pylist()] == ["en"] * 5
    assert min(score for t in tables for score in t.column("language_score").to_pylist()) > 0.65
    summary = result.summary()
    for line in ("dropped: language.not_listed", "dropped: gopher_quality.bullet_lines", "dropped by "
                 "gopher_quality.min_words, first 1:", f"{src_a}:4 [en ", f"{src_a}:2 [de "):
        assert line in summary
