"""Mixtures (`data.mixture`): named sources weighted into one dataset, against a plain single-process reference of
what each document's copies should be (membership, caps, weights, repeats), on corpora hypothesis draws (many small
files, empty files, caps that bite, weights of 0, a mixture larger than its sources). The stage runs its real task
code in process (`pipeline.in_process`: the property tests show it builds what Ray builds); one test runs the CLI
from an empty directory on a local Ray and trains on the mixture."""

from __future__ import annotations

import glob
import json
import math
import os
import random
import subprocess
import sys
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from llm_platform import storage
from llm_platform.config import compose
from llm_platform.data import dedup, mixture, pipeline
from llm_platform.errors import ConfigError, DataError

WORDS = [a + b for a in ("ka", "lo", "mi", "su", "te", "ra", "no", "vi", "pe", "do") for b in ("p", "t", "n", "s", "m")]
SEQ_LEN = 2  # at most one token of a shard is left over: every document can be read back from the shards


def make_docs(tag: str, n: int, rng: random.Random) -> list[str]:
    return [f"{tag} {i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) for i in range(n)]


def write_files(folder, docs: list[str], files: int) -> list[str]:
    """`docs` over `files` JSONL files (some may be empty); returns each document's file, in order."""
    folder.mkdir(parents=True, exist_ok=True)
    cuts = sorted({0, len(docs), *range(0, len(docs), max(1, -(-len(docs) // files)))})
    where = []
    for f in range(files):
        part = docs[cuts[f]:cuts[f + 1]] if f + 1 < len(cuts) else []
        path = folder / f"part-{f:02d}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
        where += [str(path)] * len(part)
    return where


def reference(docs: dict[str, list[str]], token_count, cfg) -> dict[str, dict[str, int]]:
    """Each document's copies per split, computed plainly from the documented rules (mixture.py's docstring)."""
    names = sorted(docs)
    rows = []  # (source, text, split, bucket, tokens)
    for name in names:
        for text in docs[name]:
            h = dedup.text_hash(text)
            rows.append((name, text, dedup.split_of(h, cfg.val_fraction),
                         int(mixture.draw_buckets(np.asarray([h], np.int64), cfg.mixture_seed)[0]), token_count(text)))
    weights = {n: cfg.mixture[n].weight / sum(cfg.mixture[m].weight for m in names) for n in names}
    pool, available = {}, {}
    for name in names:
        src = cfg.mixture[name]
        tokens, documents, pool[name] = 0, 0, mixture.BUCKETS
        per_bucket = [[0, 0] for _ in range(mixture.BUCKETS)]
        for s, _, split, b, t in rows:
            if s == name and split == "train":
                per_bucket[b][0] += 1
                per_bucket[b][1] += t
        for b, (d, t) in enumerate(per_bucket):
            if (src.max_documents and documents + d > src.max_documents) or (src.max_tokens and tokens + t >
                                                                             src.max_tokens):
                pool[name] = b
                break
            documents, tokens = documents + d, tokens + t
        available[name] = (tokens, per_bucket)
    used = [n for n in names if weights[n] > 0]
    for n in used:
        if available[n][0] == 0:
            return {"error": n}
    total = cfg.mixture_tokens or math.floor(min(available[n][0] / weights[n] for n in used))
    copies: dict[str, dict[str, int]] = {"train": {}, "val": {}}
    for name in names:
        have, per_bucket = available[name]
        want = total * weights[name]
        passes = int(want // have) if have else 0
        rest = want - passes * have
        below = [0]
        for b in range(pool[name]):
            below.append(below[-1] + per_bucket[b][1])
        partial = min(range(len(below)), key=lambda k: abs(below[k] - rest))
        for s, text, split, b, _ in rows:
            if s != name:
                continue
            n = passes + (b < partial) if b < pool[name] else 0
            copies[split][text] = min(n, 1) if split == "val" else n
    return copies


def read_back(out: str, tokenizer_dir: str, texts: list[str], order: dict[str, tuple]) -> dict[str, list[list[str]]]:
    """Each split's shards as the documents they hold, in stream order (a shard: documents joined by EOS)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    by_ids = {tuple(tok.encode(t, add_special_tokens=False).ids): t for t in texts}
    eos = json.loads(storage.read_text(os.path.join(out, "manifest.json")))["tokenizer"]["eos_token_id"]
    found: dict[str, list[list[str]]] = {"train": [], "val": []}
    for split in found:
        folder = os.path.join(out, split)
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            stream = np.concatenate(pq.read_table(os.path.join(folder, name)).column("input_ids").to_numpy(
                zero_copy_only=False)).tolist() if pq.read_metadata(os.path.join(folder, name)).num_rows else []
            pieces, current = [], []
            for t in stream:
                if t == eos:
                    pieces.append(current)
                    current = []
                else:
                    current.append(t)
            if current:
                pieces.append(current)  # the last document, its EOS the one token left over
            found[split].append([by_ids[tuple(p)] for p in pieces])
    return found


sources_strategy = st.lists(
    st.tuples(st.integers(0, 40), st.integers(1, 4), st.sampled_from([0.0, 0.2, 1.0, 2.5]),
              st.sampled_from([0, 3, 12]), st.sampled_from([0, 150, 600])),
    min_size=2, max_size=3)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=sources_strategy, scale=st.sampled_from([0, 0.5, 3.0]), seed=st.integers(0, 3))
def test_mixture_takes_what_the_reference_says(tmp_path_factory, spec, scale, seed):
    tmp = tmp_path_factory.mktemp("mix")
    rng = random.Random(seed)
    docs, where = {}, {}
    names = [f"s{i}" for i in range(len(spec))]
    entries = []
    for name, (n, files, weight, max_docs, max_tokens) in zip(names, spec):
        docs[name] = make_docs(name, n, rng)
        where.update(zip(docs[name], write_files(tmp / name, docs[name], files)))
        entries.append(f"{name}: {{sources: [{tmp / name}], weight: {weight}, max_documents: {max_docs}, "
                       f"max_tokens: {max_tokens}}}")
    total = int(scale * sum(len(d) for d in docs.values()) * 15)
    root = str(tmp / "store")
    overrides = ["debug=smoke", f"storage.root={root}", "data.name=mix", f"data.seq_len={SEQ_LEN}",
                 "data.dedup.near=false", "data.val_fraction=0.2", f"data.mixture_seed={seed}",
                 f"data.mixture_tokens={total}", "data.mixture={" + ", ".join(entries) + "}"]
    cfg = compose("data", overrides)
    if sum(s[2] for s in spec) == 0:
        with pytest.raises(ConfigError, match="every weight is 0"):
            pipeline.build_dataset(cfg.data, cfg.tokenizer, root, progress=False, executor=pipeline.in_process)
        event("every weight 0")
        return
    try:
        result = pipeline.build_dataset(cfg.data, cfg.tokenizer, root, progress=False, executor=pipeline.in_process)
    except DataError as e:
        # Only a weighted source with nothing left in its pool stops the stage, and it is named.
        assert "no train tokens left" in str(e)
        from tokenizers import Tokenizer

        [tokenizer_dir] = glob.glob(os.path.join(root, "datasets", "mix", "*", "tokenizer", "tokenizer.json"))
        tok = Tokenizer.from_file(tokenizer_dir)
        expected = reference(docs, lambda t: len(tok.encode(t, add_special_tokens=False).ids) + 1, cfg.data)
        assert "error" in expected and f"data.mixture.{expected['error']}:" in str(e)
        event("a weighted source with an empty pool")
        return
    m = result.manifest
    assert m["counts"]["dropped"] == {}
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(result.uri, "tokenizer", "tokenizer.json"))
    expected = reference(docs, lambda t: len(tok.encode(t, add_special_tokens=False).ids) + 1, cfg.data)
    assert "error" not in expected
    event("built, repeats" if any(n > 1 for n in expected["train"].values()) else "built, no repeats")
    texts = [t for d in docs.values() for t in d]
    order = {t: (where[t], i) for i, t in enumerate(texts)}
    found = read_back(result.uri, os.path.join(result.uri, "tokenizer"), texts, order)
    for split in ("train", "val"):
        got = Counter(t for shard in found[split] for t in shard)
        assert got == Counter({t: n for t, n in expected[split].items() if n}), split
        for shard in found[split]:  # pass 0 in document order, then pass 1, ...: copy numbers never go down
            seen: Counter = Counter()
            passes = []
            for t in shard:
                passes.append(seen[t])
                seen[t] += 1
            assert passes == sorted(passes)
            for k in set(passes):
                run = [order[t] for t, p in zip(shard, passes) if p == k]
                assert run == sorted(run)
    # The manifest's realised figures are what the shards hold, per source.
    record = m["mixture"]
    for name in names:
        for split in ("train", "val"):
            held = [t for shard in found[split] for t in shard if t.startswith(name + " ")]
            assert record["sources"][name][split]["documents"] == len(held)
            assert record["sources"][name][split]["tokens"] == sum(
                len(tok.encode(t, add_special_tokens=False).ids) + 1 for t in held)
    train_tokens = sum(record["sources"][n]["train"]["tokens"] for n in names)
    for name in names:
        assert record["sources"][name]["share"] == pytest.approx(
            record["sources"][name]["train"]["tokens"] / max(1, train_tokens), abs=1e-6)


def test_weights_are_met_on_a_larger_corpus_and_the_seed_decides(tmp_path):
    """600 and 200 documents weighted 0.3 / 0.7: the scarce source is taken whole and the other sampled to within a
    bucket of its share; the same seed rebuilds the same shards, another seed takes other documents."""
    rng = random.Random(3)
    web, code = make_docs("web", 600, rng), make_docs("code", 200, rng)
    write_files(tmp_path / "web", web, 5)
    write_files(tmp_path / "code", code, 2)
    mix = (f"data.mixture={{web: {{sources: [{tmp_path / 'web'}], weight: 0.3}}, "
           f"code: {{sources: [{tmp_path / 'code'}], weight: 0.7}}}}")

    def build(root: str, seed: int):
        cfg = compose("data", ["debug=smoke", f"storage.root={root}", "data.name=mix", "data.seq_len=64",
                               "data.dedup.near=false", f"data.mixture_seed={seed}", mix])
        return pipeline.build_dataset(cfg.data, cfg.tokenizer, root, progress=False, executor=pipeline.in_process)

    first = build(str(tmp_path / "a"), 0)
    rec = first.manifest["mixture"]["sources"]
    assert rec["code"]["repeats"] == 1.0 and rec["code"]["train"]["tokens"] == rec["code"]["pool"]["tokens"]
    assert rec["web"]["share"] == pytest.approx(0.3, abs=0.01) and rec["code"]["share"] == pytest.approx(0.7, abs=0.01)
    assert rec["web"]["train"]["documents"] < rec["web"]["available"]["documents"]

    def shards(result):
        files = first.manifest["splits"]["train"]["files"]
        return [storage.read_bytes(storage.join(result.uri, f)) for f in files]

    again = build(str(tmp_path / "b"), 0)
    assert again.manifest["fingerprint"] == first.manifest["fingerprint"] and shards(again) == shards(first)
    other = build(str(tmp_path / "c"), 1)
    assert other.manifest["fingerprint"] != first.manifest["fingerprint"]
    assert other.manifest["mixture"]["sources"]["web"]["share"] == pytest.approx(0.3, abs=0.01)
    assert shards(other) != shards(first)


def test_one_crawl_split_by_language(tmp_path):
    """One multilingual file feeds two sources by detected language (LID-176); French belongs to neither and is
    counted as unassigned."""
    from tests.integration.test_data_filters_stage import ENGLISH, FRENCH, GERMAN, write_jsonl

    (tmp_path / "crawl").mkdir()
    write_jsonl(str(tmp_path / "crawl" / "a.jsonl"), [ENGLISH[0], GERMAN[0], FRENCH, ENGLISH[1], GERMAN[1],
                                                      ENGLISH[2]])
    crawl = tmp_path / "crawl"
    root = str(tmp_path / "store")
    cfg = compose("data", ["debug=smoke", f"storage.root={root}", "data.name=langs", "data.seq_len=32",
                           "data.dedup.near=false", "data.val_fraction=0",
                           f"data.mixture={{en: {{sources: [{crawl}], languages: [en], weight: 0.5}}, "
                           f"de: {{sources: [{crawl}], languages: [de], weight: 0.5}}}}", "data.mixture_tokens=400"])
    m = pipeline.build_dataset(cfg.data, cfg.tokenizer, root, progress=False, executor=pipeline.in_process).manifest
    rec = m["mixture"]
    assert rec["sources"]["en"]["available"]["documents"] == 3 and rec["sources"]["de"]["available"]["documents"] == 2
    assert rec["unassigned"]["documents"] == 1
    assert rec["sources"]["en"]["files"] == rec["sources"]["de"]["files"] == 1
    assert m["counts"]["languages"]["detected"] == {"en": 3, "de": 2, "fr": 1}


@pytest.mark.parametrize("overrides, message", [
    (["data.sources=[x]", "data.mixture={a: {sources: [y]}}"], "data.sources and data.mixture are both set"),
    (["data.mixture={a: {sources: []}}"], r"data.mixture.a.sources is empty"),
    (["data.mixture={a: {sources: [y], weight: -1}}"], r"data.mixture.a.weight=-1.0 must be"),
    (["data.mixture={a: {sources: [y], max_documents: -2}}"], r"data.mixture.a.max_documents=-2"),
    (["data.mixture={a: {sources: [y], languages: [english]}}"], r"data.mixture.a.languages: \['english'\]"),
    (["data.mixture={../a: {sources: [y]}}"], r"data.mixture"),
    (["data.mixture={a: {sources: [y]}}", "data.mixture_tokens=-1"], r"data.mixture_tokens=-1"),
])
def test_bad_mixture_config_names_the_key(overrides, message):
    cfg = compose("data", ["debug=smoke", *overrides])
    with pytest.raises(ConfigError, match=message):
        pipeline.validate(cfg.data, cfg.tokenizer)


def test_a_misspelled_mixture_key_is_refused():
    with pytest.raises(Exception, match="wieght"):
        compose("data", ["data.mixture={a: {sources: [y], wieght: 2}}"])


@pytest.mark.ray
@pytest.mark.slow
def test_cli_builds_a_mixture_from_an_empty_directory_and_trains_on_it(tmp_path, ray_session):
    """The user's path: relative source folders, the default relative storage root, `llm-platform data` then
    `llm-platform train` with the same overrides (training reads the mixture as one dataset)."""
    rng = random.Random(9)
    for name, n in (("web", 120), ("books", 40)):
        write_files(tmp_path / "corpora" / name, make_docs(name, n, rng), 3)
    overrides = ["debug=smoke", "data.mixture.web.sources=[corpora/web]", "data.mixture.web.weight=0.6",
                 "data.mixture.books.sources=[corpora/books/*.jsonl]", "data.mixture.books.weight=0.4",
                 "data.mixture.books.max_documents=30"]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    data = subprocess.run([sys.executable, "-m", "llm_platform", "data", *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert data.returncode == 0, data.stderr[-3000:]
    out = data.stdout + data.stderr
    assert "mixture (seed 0," in out and "(capped)" in out
    [manifest] = glob.glob(str(tmp_path / ".llm-platform" / "storage" / "datasets" / "*" / "*" / "manifest.json"))
    rec = json.loads(open(manifest).read())["mixture"]
    assert rec["sources"]["books"]["pool"]["documents"] <= 30 and rec["sources"]["books"]["pool"]["capped"]
    assert rec["sources"]["web"]["share"] == pytest.approx(0.6, abs=0.05)
    train = subprocess.run([sys.executable, "-m", "llm_platform", "train", *overrides, "train.max_steps=2"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stderr[-3000:]
    lineage = json.loads(open(glob.glob(str(tmp_path / ".llm-platform" / "storage" / "runs" / "*" /
                                             "lineage.json"))[0]).read())
    assert lineage["dataset"]["uri"] == os.path.dirname(manifest)


def test_sources_can_be_named_one_key_at_a_time(tmp_path, monkeypatch):
    """`data.mixture.<name>.<key>=` adds a typed source (Hydra refuses a new dict entry without `++`, and OmegaConf
    would make it an untyped dict); relative paths are made absolute like data.sources."""
    from llm_platform.config.data import MixtureSource

    monkeypatch.chdir(tmp_path)
    cfg = compose("data", ["data.mixture.web.sources=[corpora/web,s3://b/x/*.jsonl]", "data.mixture.web.weight=0.6",
                           "++data.mixture.code.max_tokens=100", "data.mixture.code.sources=[code]"])
    assert cfg.data.mixture == {
        "web": MixtureSource(sources=[str(tmp_path / "corpora" / "web"), "s3://b/x/*.jsonl"], weight=0.6),
        "code": MixtureSource(sources=[str(tmp_path / "code")], max_tokens=100)}
