"""Property tests of the data stage (issue #24): hypothesis writes corpora, the stage builds a dataset from them, and
the dataset must equal what the plain reference (tests/fixtures/data_reference.py) says it must be.

Corpora: 1 to a few hundred files (most examples a handful), 0 to a dozen records each, empty files; every input
format (jsonl, json, parquet, text by file/paragraph/line) and compression (gzip and zstd, in one or two
members/frames); every record kind (pretrain, sft, seq2seq, chat); duplicates within and across files, exact up to
case and spacing, and near duplicates; unicode edge cases (combining marks, emoji and ZWJ, RTL and bidi marks,
NUL and control characters, invalid UTF-8 bytes, CRLF, BOM, NEL, non-BMP); bad records (malformed JSON, missing
or mistyped fields, lines over `data.max_record_bytes`); val_fraction from 0 to 0.5; a tokenizer sample stride
above 1.

Invariants: valid input never crashes; every record read is counted exactly once (kept, dropped by reason, exact
or near duplicate), in the manifest's counts as in the reference's; the shards hold the reference's token streams
and rows, shard by shard; the tokenizer is the BPE trained on the reference's sample; the same inputs give
byte-identical datasets and equal manifests (timings, dates, fingerprint and the listing aside) whatever order the
files are listed in, however they are grouped into tasks and whatever order the tasks run in, in process or on Ray.

Most examples run the stage with `pipeline.in_process` (the real task code, no Ray: 0.1 to 1 s an example here); three
run through the session's Ray. The example counts fit about two minutes on a 2-core machine (`ci` profile,
derandomized; `HYPOTHESIS_PROFILE=dev` explores new examples).

The bugs these tests found are the tests at the end, each with its minimal reproduction (all fixed with them).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import io
import json
import os
import random
import tempfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures import data_reference as ref
from hypothesis import event, given, settings
from hypothesis import strategies as st

from llm_platform.config import compose
from llm_platform.config.choices import ChatOverflow, DatasetKind, TextUnit
from llm_platform.data import encode, phases, pipeline, prepare
from llm_platform.data import tokenizer as tokenizers
from llm_platform.data.exchange import PartitionedWriter
from llm_platform.data.executor import Ran

# ------------------------------------------------------------------------------------------------ the words
ASCII_WORDS = ("the quick brown fox jumps over lazy dog river stone lamp harbor night morning garden bridge window "
               "letter music silver forest candle winter summer market station keeper tower ocean cloud").split()
EDGE_WORDS = [
    "caf\u00e9", "cafe\u0301",  # NFC and NFD spellings: one word after normalization
    "e\u0301te\u0301", "Stra\u00dfe", "\ufb01ne", "\uff21\uff22\uff23",  # ligature and fullwidth: NFKC folds them
    "\U0001d518\U0001d52b\U0001d526",  # non-BMP letters
    "\U0001f600", "\U0001f469\u200d\U0001f469\u200d\U0001f467",  # emoji, a ZWJ family
    "\u05e9\u05dc\u05d5\u05dd", "\u0645\u0631\u062d\u0628\u0627", "\u202b\u05e2\u05d1\u05e8\u05d9\u05ea\u202c",  # RTL
    "\u65e5\u672c\u8a9e", "a\x00b", "bell\x07", "esc\x1b[0m", "nbsp\u00a0here", "wide\u3000space",
    "zero\u200bwidth", "tab\tbed", "line\u2028sep", "nel\x85x", "\ufeffbom", "cr\rin",
]
PII_WORDS = ["bob@example.com", "10.0.0.1", "555-123-4567", "+1 (555) 123-4567"]
WORDS = ASCII_WORDS * 4 + EDGE_WORDS + PII_WORDS  # repeated to weight plain words: most documents pass the filters
SEPARATORS = [" "] * 24 + ["  ", "\t", "\n", "\r\n", " \n", "\u00a0", ". ", "! ", ". ", ", ", " # ", "... "]
INVALID_UTF8 = [b"\xff", b"\xc3(", b"\xe9", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"]
LINE_BREAKS = [b"\n", b"\n", b"\r\n", b"\n\n", b"\n  \n", b"\r\n\r\n", b"\n\t\n\n"]


@st.composite
def document(draw) -> str:
    """Words joined by separators."""
    n = draw(st.integers(0, 30))
    words = draw(st.lists(st.sampled_from(WORDS), min_size=n, max_size=n))
    seps = draw(st.lists(st.sampled_from(SEPARATORS), min_size=n, max_size=n))
    return "".join(w + s for w, s in zip(words, seps))


def text_like(draw, pool: list[str]) -> str:
    """A new document, or one of the corpus's pool as is, changed in case or spacing (an exact duplicate after
    folding) or by a word (a near duplicate when it is long enough)."""
    how = draw(st.sampled_from(["new", "new", "same", "case", "space", "near"]))
    if how == "new" or not pool:
        return draw(document())
    base = draw(st.sampled_from(pool))
    if how == "case":
        return base.upper()
    if how == "space":
        return base.replace(" ", "  ")
    if how == "near":
        word = draw(st.sampled_from(ASCII_WORDS))
        return draw(st.sampled_from([base + " " + word, word + " " + base, base.replace(" ", f" {word} ", 1)]))
    return base


def record_fields(draw, kind: str, pool: list[str]) -> dict:
    """One JSON object of `kind`, sometimes missing its field or with a wrong type."""
    if kind == "pretrain":
        form = draw(st.sampled_from(["ok"] * 8 + ["extra", "missing", "wrong_type"]))
        text = text_like(draw, pool)
        return {"ok": {"text": text}, "extra": {"id": 7, "text": text, "meta": {"lang": "en"}},
                "missing": {"body": text}, "wrong_type": {"text": draw(st.sampled_from([7, None, ["a"]]))}}[form]
    if kind in ("sft", "seq2seq"):
        p, r = ("prompt", "response") if kind == "sft" else ("source", "target")
        form = draw(st.sampled_from(["ok"] * 8 + ["missing", "wrong_type"]))
        fields = {p: text_like(draw, pool), r: text_like(draw, pool)}
        if form == "missing":
            del fields[draw(st.sampled_from([p, r]))]
        elif form == "wrong_type":
            fields[r] = 3
        return fields
    form = draw(st.sampled_from(["messages"] * 3 + ["alpaca", "prompt", "bad"]))

    def content() -> str:
        return text_like(draw, pool)

    if form == "messages":
        messages = [{"role": "system", "content": content()}] if draw(st.booleans()) else []
        for _ in range(draw(st.integers(1, 3))):
            messages += [{"role": "user", "content": content()}, {"role": "assistant", "content": content()}]
        return {"messages": messages}
    if form == "alpaca":
        return {"instruction": content(), "input": draw(st.sampled_from(["", "x"])) and content(),
                "output": content()}
    if form == "prompt":
        return {"prompt": content(), "response": content()}
    return draw(st.sampled_from([
        {"messages": []}, {"messages": "hello"}, {"messages": [{"role": "robot", "content": "beep boop bop"}]},
        {"messages": [{"role": "user", "content": "only a question here"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "an answer"}]},
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "an answer"}]},
        {"instruction": "do the thing now"}, {"prompt": 5, "response": "five"}, {"other": 1}]))


# --------------------------------------------------------------------------------------------- the corpora
@dataclass
class CorpusFile:
    name: str  # path under the corpus folder
    fmt: str  # jsonl, json, parquet, text
    compression: str | None
    frames: int  # gzip members or zstd frames
    data: bytes  # the uncompressed bytes


@dataclass
class Corpus:
    kind: str
    files: list[CorpusFile]
    settings: dict  # data config fields (and `max_training_documents` of the tokenizer)


EXTENSIONS = {"jsonl": [".jsonl", ".ndjson"], "json": [".json"], "parquet": [".parquet"],
              "text": [".txt", ".text", ".md"]}
FORMATS = {"pretrain": ["jsonl", "jsonl", "json", "parquet", "text", "text"],
           "sft": ["jsonl", "jsonl", "json", "parquet", "text"], "seq2seq": ["jsonl", "json", "parquet"],
           "chat": ["jsonl", "jsonl", "json"]}
COLUMNS = {"pretrain": ["text"], "sft": ["prompt", "response"], "seq2seq": ["source", "target"]}


def jsonl_bytes(draw, kind: str, pool: list[str]) -> bytes:
    ascii_only = draw(st.booleans())
    lines = []
    for _ in range(draw(st.integers(0, 3) | st.integers(4, 12))):
        form = draw(st.sampled_from(["record"] * 8 + ["blank", "malformed", "invalid_utf8", "not_object"]))
        if form == "record":
            lines.append(json.dumps(record_fields(draw, kind, pool), ensure_ascii=ascii_only).encode())
        elif form == "blank":
            lines.append(draw(st.sampled_from([b"", b"   ", b"\t"])))
        elif form == "malformed":
            lines.append(b'{"text": "an unterminated string')
        elif form == "invalid_utf8":
            lines.append(b'{"text": "caf' + draw(st.sampled_from(INVALID_UTF8)) + b' au lait for the river"}')
        else:
            lines.append(draw(st.sampled_from([b"[1, 2, 3]", b'"just a string"', b"42"])))
    data = draw(st.sampled_from([b"\n", b"\r\n"])).join(lines)
    if lines and draw(st.booleans()):
        data += b"\n"
    return (b"\xef\xbb\xbf" + data) if draw(st.integers(0, 9)) == 0 else data  # now and then a UTF-8 BOM


def json_bytes(draw, kind: str, pool: list[str]) -> bytes:
    rows: list = [record_fields(draw, kind, pool) if draw(st.integers(0, 9)) else 7
                  for _ in range(draw(st.integers(0, 3) | st.integers(4, 10)))]
    wrapper = draw(st.sampled_from(["list", "data", "rows"]))
    obj = rows if wrapper == "list" else {wrapper: rows}
    return json.dumps(obj, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 2]))).encode()


def parquet_bytes(draw, kind: str, pool: list[str]) -> bytes:
    columns = COLUMNS[kind]
    rows = [record_fields(draw, kind, pool) for _ in range(draw(st.integers(0, 3) | st.integers(4, 10)))]
    table = pa.table({c: pa.array([r.get(c) if isinstance(r.get(c), str) else None for r in rows], pa.string())
                      for c in columns} | {"id": pa.array(range(len(rows)), pa.int64())})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=draw(st.integers(1, 4)))
    return buf.getvalue()


def text_bytes(draw, pool: list[str]) -> bytes:
    pieces = []
    for _ in range(draw(st.integers(0, 2) | st.integers(3, 8))):
        if draw(st.integers(0, 7)) == 0:
            pieces.append(b"caf" + draw(st.sampled_from(INVALID_UTF8)) + b" is where the keeper sat")
        else:
            pieces.append(text_like(draw, pool).encode())
        pieces.append(draw(st.sampled_from(LINE_BREAKS)))
    if pieces and draw(st.booleans()):
        pieces.pop()  # no line break at the end
    return b"".join(pieces)


LONG_TEXT = " ".join(ASCII_WORDS[(i * 7) % len(ASCII_WORDS)] for i in range(12_000))  # about 70 KB


def enlarged(f: CorpusFile, kind: str) -> bytes:
    """A line-based file made about 150 KB long (its lines repeated) with a line of about 70 KB in the middle: lines
    that cross the reader's 64 KB chunks, and, for a file cut into byte ranges, many ranges and a line longer than
    one."""
    long_record = {"pretrain": {"text": LONG_TEXT}, "sft": {"prompt": LONG_TEXT, "response": "a short answer"},
                   "seq2seq": {"source": LONG_TEXT, "target": "a short target"},
                   "chat": {"messages": [{"role": "user", "content": LONG_TEXT},
                                         {"role": "assistant", "content": "a short answer"}]}}[kind]
    long_line = json.dumps(long_record).encode() if f.fmt == "jsonl" else LONG_TEXT.encode()
    data = f.data if f.data.endswith(b"\n") or not f.data else f.data + b"\n"
    half = data * (75_000 // max(1, len(data))) if data else b""
    return half + long_line + b"\n" + half


@st.composite
def corpora(draw, kinds=("pretrain",), min_files: int = 1, max_files: int = 6, large: bool = True) -> Corpus:
    """A corpus of `kinds` records and the data config's settings for it (`large`: now and then one file of about
    150 KB, `enlarged`)."""
    kind = draw(st.sampled_from(kinds))
    pool = draw(st.lists(document(), min_size=1, max_size=4))
    files = []
    for i in range(draw(st.integers(min_files, max_files))):
        fmt = draw(st.sampled_from(FORMATS[kind]))
        if fmt == "jsonl":
            data = jsonl_bytes(draw, kind, pool)
        elif fmt == "json":
            data = json_bytes(draw, kind, pool)
        elif fmt == "parquet":
            data = parquet_bytes(draw, kind, pool)
        else:
            data = text_bytes(draw, pool)
        # Parquet's own compression only: a compressed .parquet.gz is read as is (test_compressed_parquet...).
        compression = None if fmt == "parquet" else draw(st.sampled_from([None, None, "gzip", "zstd"]))
        folder = draw(st.sampled_from(["", "", "a/", "a/b/", "x y/"]))
        ext = draw(st.sampled_from(EXTENSIONS[fmt])) + {None: "", "gzip": ".gz", "zstd": ".zst"}[compression]
        tag = draw(st.sampled_from(["", "-part", "-\u00e9t\u00e9"]))
        files.append(CorpusFile(f"{folder}{i:03d}{tag}{ext}", fmt, compression, draw(st.integers(1, 2)), data))
    line_files = [i for i, f in enumerate(files) if f.fmt in ("jsonl", "text")]
    if large and line_files and draw(st.integers(0, 7)) == 0:
        i = draw(st.sampled_from(line_files))
        files[i] = dataclasses.replace(files[i], data=enlarged(files[i], kind))
    settings_ = {
        "text_unit": TextUnit(draw(st.sampled_from(["file", "paragraph", "line"]))),
        "val_fraction": draw(st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.5]) | st.floats(0.0, 0.5)),
        "num_shards": draw(st.integers(1, 3)),
        "seq_len": draw({"pretrain": st.integers(4, 40), "chat": st.integers(16, 64) | st.integers(64, 600)}.get(
            kind, st.integers(6, 48) | st.integers(48, 160))),
        "target_len": draw(st.integers(2, 16)),
        "normalize": draw(st.sampled_from(["NFC", "NFC", "NFKC", ""])),
        "scrub_pii": draw(st.booleans()),
        "max_record_bytes": draw(st.sampled_from([16_000_000] * 6 + [120, 400])),
        "max_records_reported": draw(st.integers(0, 8)),
        "chat_overflow": ChatOverflow(draw(st.sampled_from(["truncate", "skip"]))),
        "dedup": {"exact": draw(st.booleans()) or draw(st.booleans()), "near": draw(st.booleans()),
                  "threshold": draw(st.sampled_from([0.5, 0.7, 0.8, 1.0])),
                  "num_perm": draw(st.sampled_from([16, 64, 128])), "shingle_words": draw(st.integers(1, 5))},
        "relaxed_filters": draw(st.booleans()),
        "max_training_documents": draw(st.integers(1, 20)),
    }
    return Corpus(kind, files, settings_)


# ------------------------------------------------------------------------------------------ running the stage
@functools.cache
def _composed(kind: str):
    preset = [] if kind == "pretrain" else [f"data={kind}"]
    cfg = compose("data", ["debug=smoke", *preset, "data.format=auto", "data.name=prop"])
    return cfg.data, cfg.tokenizer


def configs(corpus: Corpus, sources: list[str], **changes):
    """The composed config of the corpus's kind with the example's settings (and `changes`: speed knobs)."""
    data, tok = _composed(corpus.kind)
    s = corpus.settings
    filters = data.filters
    if s["relaxed_filters"]:
        filters = dataclasses.replace(filters, min_chars=1, min_words=1, mean_word_length=False,
                                      symbol_ratio=False, alpha_fraction=False, repeated_lines=False)
    data = dataclasses.replace(
        data, kind=DatasetKind(corpus.kind), sources=list(sources), filters=filters,
        dedup=dataclasses.replace(data.dedup, **s["dedup"]),
        **{k: s[k] for k in ("text_unit", "val_fraction", "num_shards", "seq_len", "target_len", "normalize",
                             "scrub_pii", "max_record_bytes", "max_records_reported", "chat_overflow")},
        **changes)
    return data, dataclasses.replace(tok, max_training_documents=s["max_training_documents"])


def compress(data: bytes, compression: str | None, frames: int) -> bytes:
    if compression is None:
        return data
    cut = len(data) // 2 if frames > 1 else len(data)
    parts = [data[:cut], data[cut:]] if frames > 1 else [data]
    if compression == "gzip":
        return b"".join(gzip.compress(p, mtime=0) for p in parts)
    import zstandard

    return b"".join(zstandard.ZstdCompressor().compress(p) for p in parts)


def write_corpus(corpus: Corpus, folder: str) -> list[ref.Source]:
    """Write the files; their records as a plain reader of the uncompressed bytes finds them."""
    data_cfg, _ = configs(corpus, [])
    out = []
    for f in corpus.files:
        path = os.path.join(folder, f.name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        stored = compress(f.data, f.compression, f.frames)
        with open(path, "wb") as fh:
            fh.write(stored)
        limit = data_cfg.max_record_bytes
        if f.fmt == "jsonl":
            records = ref.read_jsonl(f.data, limit)
        elif f.fmt == "json":
            records = [(1, None, "record_too_large")] if len(stored) > 4 * limit else ref.read_json(f.data)
        elif f.fmt == "parquet":
            records = ref.read_parquet(f.data, COLUMNS.get(corpus.kind, []))
        else:
            records = ref.read_text(f.data, str(data_cfg.text_unit), limit, size=len(stored))
        out.append(ref.Source(path, len(stored), records))
    return out


def shuffled(seed: int):
    """An executor that runs a phase's tasks in process, in a shuffled order, one `in_process` call per task; the
    results in the items' order (what every executor returns)."""

    def run(fn, items, *, num_cpus, **kwargs):
        order = list(range(len(items)))
        random.Random(seed).shuffle(order)
        ran = {i: pipeline.in_process(fn, [items[i]], num_cpus=num_cpus, **kwargs) for i in order}
        return Ran([ran[i].values[0] for i in range(len(items))], sum(r.cpu_s for r in ran.values()),
                   sum(r.wall_s for r in ran.values()))

    return run


def build(corpus: Corpus, sources: list[str], root: str, executor=pipeline.in_process, **changes):
    data_cfg, tok_cfg = configs(corpus, sources, **changes)
    return pipeline.build_dataset(data_cfg, tok_cfg, root, progress=False, executor=executor)


def read_shard(uri: str, rel: str) -> dict[str, list]:
    return pq.read_table(os.path.join(uri, rel)).to_pydict()


def dataset_bytes(uri: str) -> dict[str, bytes]:
    """Every file of a dataset folder but its manifest, by relative path."""
    out = {}
    for folder, _, names in os.walk(uri):
        for name in names:
            path = os.path.join(folder, name)
            if name != "manifest.json":
                with open(path, "rb") as f:
                    out[os.path.relpath(path, uri)] = f.read()
    return out


def comparable(manifest: dict) -> dict:
    """The manifest without what may differ between two builds of the same inputs: timings, date, fingerprint, the
    listing of the sources and the knobs that change speed only. And without the skipped-record sample, which
    names byte ranges when a file is cut into pieces (test_task_size_does_not_change_the_skipped_sample)."""
    m = json.loads(json.dumps(manifest))
    for key in ("timings_s", "created_at", "fingerprint", "units", "skipped"):
        m.pop(key, None)
    m["counts"].pop("units", None)  # how the files were grouped into tasks
    for key in ("sources", "tokenize_batch_size", "task_target_bytes"):
        m["config"]["data"].pop(key, None)
    return m


# ------------------------------------------------------------------------------------- comparing with the reference
def check_against_reference(corpus: Corpus, sources: list[ref.Source], result) -> ref.Expected:
    m = result.manifest
    data_cfg, tok_cfg = configs(corpus, [])
    exp = ref.expect(sources, data_cfg, tok_cfg)
    for what, seen in (("exact duplicates", exp.exact), ("near duplicates", exp.near),
                       ("dropped records", exp.skipped), ("val documents", "val" in exp.split.values()),
                       ("tokenizer sample stride > 1", len(exp.tokenizer_sample) < len(exp.survivors)),
                       ("a file over 100 KB", max((s.size for s in sources), default=0) > 100_000)):
        event(f"{corpus.kind}: {what}" if seen else f"{corpus.kind}: no {what}")
    # Every record read is counted exactly once: kept, dropped by reason, exact or near duplicate.
    counts = m["counts"]
    assert counts["records_in"] == sum(len(s.records) for s in sources)
    assert counts["records_in"] == (sum(counts["dropped"].values()) + counts["exact_duplicates"] +
                                    counts["near_duplicates"] + counts["documents_kept"])
    assert {k: counts[k] for k in exp.counts} == exp.counts
    reported = [(s["source"], s["line"], s["reason"].split(":")[0]) for s in m["skipped"]]
    assert reported == exp.skipped[:data_cfg.max_records_reported]

    tokenizer_dir = os.path.join(result.uri, "tokenizer")
    reference_tok = tokenizers.train_bpe(exp.tokenizer_sample, tok_cfg).backend_tokenizer.to_str()
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json")).to_str() == reference_tok, \
        "the tokenizer is not the BPE trained on the reference's sample"

    ref.expect_shards(exp, data_cfg, tokenizer_dir)
    splits = ref.expected_splits(exp, data_cfg.seq_len)
    for name in ("train", "val"):
        got = {k: v for k, v in m["splits"][name].items() if k != "row_groups"}
        assert got == splits[name], name
        for rel, runs in zip(got["files"], m["splits"][name].get("row_groups", [])):
            assert sum(n * c for n, c in runs) == len(read_shard(result.uri, rel)["input_ids"])
    for shard, want in exp.shards.items():
        if not want["records"]:
            continue
        split, index = shard.rsplit("-", 1)
        assert read_shard(result.uri, f"{split}/part-{index}.parquet") == want["rows"], shard
    if corpus.kind == "pretrain":  # the drift monitor's reference: the train tokens' frequencies
        counted = [t for s, want in exp.shards.items() if s.startswith("train") for t in want["counted"]]
        vocab = m["tokenizer"]["vocab_size"]
        freqs = np.bincount(np.asarray(counted, np.int64), minlength=vocab)[:vocab] / max(1, len(counted))
        assert m["stats"]["token_frequencies"] == freqs.tolist()
    return exp


# ------------------------------------------------------------------------------------------------- the tests
@settings(max_examples=200)
@given(corpora(kinds=("pretrain",)))
def test_pretrain_datasets_equal_the_reference(corpus):
    with tempfile.TemporaryDirectory(prefix="llmp-prop-") as tmp:
        sources = write_corpus(corpus, os.path.join(tmp, "corpus"))
        result = build(corpus, [os.path.join(tmp, "corpus")], os.path.join(tmp, "store"))
        check_against_reference(corpus, sources, result)


@settings(max_examples=100)
@given(corpora(kinds=("sft", "seq2seq", "chat", "chat")))
def test_supervised_and_chat_datasets_equal_the_reference(corpus):
    with tempfile.TemporaryDirectory(prefix="llmp-prop-") as tmp:
        sources = write_corpus(corpus, os.path.join(tmp, "corpus"))
        result = build(corpus, [os.path.join(tmp, "corpus")], os.path.join(tmp, "store"))
        check_against_reference(corpus, sources, result)


def _small_batches_and_runs(mp: pytest.MonkeyPatch) -> None:
    """Cut every batch and exchange run small, so that one file's documents span several read batches (MinHash
    signatures computed batch by batch), several key partitions (dedup tasks) and several runs per partition."""
    mp.setattr(prepare, "READ_BATCH_ROWS", 3)
    mp.setattr(phases, "KEY_PARTITION_BYTES", 200)
    small = functools.partial(PartitionedWriter, flush_bytes=64)
    mp.setattr(prepare, "PartitionedWriter", small)
    mp.setattr(encode, "PartitionedWriter", small)


@settings(max_examples=40)
@given(corpora(kinds=("pretrain", "pretrain", "sft", "seq2seq", "chat"), max_files=8),
       st.randoms(use_true_random=False))
def test_output_is_independent_of_listing_grouping_and_task_order(corpus, rng):
    """The same inputs listed as a folder or file by file in a shuffled order, grouped into tasks by the default
    size or a few bytes per task (files cut into byte ranges), batched and exchanged in large or tiny pieces, their
    tasks run in order or shuffled: byte-identical datasets and equal manifests."""
    with tempfile.TemporaryDirectory(prefix="llmp-prop-") as tmp:
        folder = os.path.join(tmp, "corpus")
        sources = write_corpus(corpus, folder)
        first = build(corpus, [folder], os.path.join(tmp, "a"))
        listed = [s.uri for s in sources]
        rng.shuffle(listed)
        with pytest.MonkeyPatch.context() as mp:
            _small_batches_and_runs(mp)
            second = build(corpus, listed, os.path.join(tmp, "b"), executor=shuffled(rng.randrange(1 << 30)),
                           task_target_bytes=max(24, sum(s.size for s in sources) // rng.choice([1, 3, 10, 40])),
                           tokenize_batch_size=rng.randint(1, 5))
        assert dataset_bytes(second.uri) == dataset_bytes(first.uri)
        assert comparable(second.manifest) == comparable(first.manifest)
        check_against_reference(corpus, sources, first)


@st.composite
def many_files(draw) -> Corpus:
    """200 to 300 small files: copies of a few drawn ones (duplicates across hundreds of files), each jsonl or text
    copy opened by a line of its own."""
    template = draw(corpora(kinds=("pretrain",), max_files=4, large=False))
    files = []
    for i in range(draw(st.integers(200, 300))):
        f = template.files[i % len(template.files)]
        own = " ".join(ASCII_WORDS[(i * 7 + j * 3) % len(ASCII_WORDS)] for j in range(6 + i % 9))
        data = f.data
        if f.fmt == "jsonl":
            data = json.dumps({"text": f"note {i}: {own}"}).encode() + b"\n" + data
        elif f.fmt == "text":
            data = f"note {i}: {own}\n\n".encode() + data
        files.append(dataclasses.replace(f, name=f"{i:03d}-{f.name.rsplit('/', 1)[-1]}", data=data))
    return Corpus(template.kind, files, template.settings)


@settings(max_examples=3)
@given(many_files())
def test_hundreds_of_small_files_equal_the_reference(corpus):
    with tempfile.TemporaryDirectory(prefix="llmp-prop-") as tmp:
        sources = write_corpus(corpus, os.path.join(tmp, "corpus"))
        result = build(corpus, [os.path.join(tmp, "corpus")], os.path.join(tmp, "store"))
        check_against_reference(corpus, sources, result)


@pytest.mark.ray
@pytest.mark.slow
@settings(max_examples=3)
@given(corpora(kinds=("pretrain", "sft", "chat"), min_files=2, max_files=5))
def test_ray_builds_the_in_process_dataset(ray_session, corpus):
    """Through Ray Data's tasks (other worker processes, another grouping of files into tasks, files cut into byte
    ranges) the dataset is the one built in process, and the reference's."""
    with tempfile.TemporaryDirectory(prefix="llmp-prop-") as tmp:
        folder = os.path.join(tmp, "corpus")
        sources = write_corpus(corpus, folder)
        in_process = build(corpus, [folder], os.path.join(tmp, "a"))
        on_ray = build(corpus, [folder], os.path.join(tmp, "b"), executor=None,
                       task_target_bytes=max(24, sum(s.size for s in sources) // 5))
        assert dataset_bytes(on_ray.uri) == dataset_bytes(in_process.uri)
        assert comparable(on_ray.manifest) == comparable(in_process.manifest)
        check_against_reference(corpus, sources, in_process)


# --------------------------------------------------------------------------------- bugs found by the tests above
def _one_build(tmp_path, files: dict[str, bytes], *overrides: str, sources: list[str] | None = None,
               store: str = "store"):
    """The stage in process on `files` (name -> bytes, written under tmp_path/corpus unless there already; listed
    as their folder unless `sources` names some of them) with `overrides` of the smoke config."""
    corpus = tmp_path / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (corpus / name).write_bytes(data)
    preset = [o for o in overrides if o.startswith("data=")]
    cfg = compose("data", ["debug=smoke", *preset, "data.format=auto", *[o for o in overrides if o not in preset]])
    data_cfg = dataclasses.replace(cfg.data, sources=[str(corpus / s) for s in sources or [""]])
    return pipeline.build_dataset(data_cfg, cfg.tokenizer, str(tmp_path / store), executor=pipeline.in_process)


STORY = "the keeper of the lighthouse watched the grey sea all night long"


def test_a_lone_surrogate_escape_is_one_bad_record_not_a_crash(tmp_path):
    """Found by these tests, fixed with them: a lone surrogate escape in a JSON string (valid JSON, common in
    truncated scraped text) crashed the whole stage with UnicodeEncodeError in text_hash/parquet; now the lone
    surrogate is removed, like a control character, and the record kept."""
    lines = [json.dumps({"text": STORY}), '{"text": "cut emoji \\ud83d in the middle of a longer sentence"}']
    m = _one_build(tmp_path, {"a.jsonl": ("\n".join(lines) + "\n").encode()}).manifest
    c = m["counts"]
    assert c["records_in"] == 2 and c["documents_kept"] >= 1
    assert c["records_in"] == sum(c["dropped"].values()) + c["documents_kept"]


def test_compressed_parquet_is_read(tmp_path):
    """Found by these tests, fixed with them: data.sources documents .parquet optionally .gz/.zst, but the parquet
    reader ignored the compression: a.parquet.gz was dropped whole as corrupt_file."""
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [STORY]}), buf)
    m = _one_build(tmp_path, {"a.parquet.gz": gzip.compress(buf.getvalue())}).manifest
    assert m["counts"]["dropped"] == {} and m["counts"]["documents_kept"] == 1


def test_chat_messages_are_cleaned_like_other_kinds(tmp_path):
    """Found by these tests, fixed in 4210e0e: chat turns were tokenized as read, so with data.scrub_pii=true the
    email and phone number reached the shards (while the manifest counted 2 replacements)."""
    record = {"messages": [{"role": "user", "content": "how do I reach the keeper of the lighthouse"},
                           {"role": "assistant", "content": "write to bob@example.com or call 555-123-4567"}]}
    result = _one_build(tmp_path, {"a.jsonl": (json.dumps(record) + "\n").encode()}, "data=chat",
                        "data.scrub_pii=true", "data.val_fraction=0", "data.seq_len=256")
    from llm_platform.data.dataset import open_dataset

    ds = open_dataset(result.uri)
    ids = pq.read_table(ds.files["train"][0])["input_ids"].to_pylist()[0]
    text = ds.load_tokenizer().decode([t for t in ids if t != ds.special_token_id("pad")])
    assert "bob@example.com" not in text and "555-123-4567" not in text
    assert "<EMAIL>" in text and "<PHONE>" in text


def test_skipped_sample_is_the_first_by_line_in_paragraph_mode(tmp_path):
    """Found by these tests, fixed with them: in paragraph mode the skipped sample was not the first records by
    line: a bad line inside a paragraph was met, and listed, before the paragraph that starts earlier, so the cut at
    data.max_records_reported kept the later one."""
    data = b"ok\nca\xff fe line\n\n" + STORY.encode() + b"\n"  # paragraph 1 (line 1) is too short; line 2 is bad
    m = _one_build(tmp_path, {"a.txt": data}, "data.text_unit=paragraph", "data.max_records_reported=1").manifest
    assert m["counts"]["dropped"] == {"too_short": 1, "invalid_utf8": 1}
    assert [(s["line"], s["reason"].split(":")[0]) for s in m["skipped"]] == [(1, "too_short")]


def test_task_size_does_not_change_the_skipped_sample(tmp_path):
    """Found by these tests, fixed with them: data.task_target_bytes is documented to change speed only, never the
    output, but a file cut into byte ranges reported its skipped records as '<uri> (bytes a-b)' with lines counted
    from the range: the manifest differed with the task size, and its lines were not the file's."""
    lines = [json.dumps({"text": f"{STORY} number {i}"}) for i in range(6)] + ["{broken"]
    files = {"a.jsonl": ("\n".join(lines) + "\n").encode()}
    whole = _one_build(tmp_path, files, store="whole").manifest
    cut = _one_build(tmp_path, {}, "data.task_target_bytes=100", store="cut").manifest
    assert cut["counts"]["units"] > whole["counts"]["units"]  # the file was cut
    assert [(s["source"].rsplit("/", 1)[1], s["line"]) for s in whole["skipped"]] == [("a.jsonl", 7)]
    assert cut["skipped"] == whole["skipped"]


def test_a_listed_file_with_brackets_in_its_name_is_read(tmp_path):
    """Found by these tests, fixed with them: a source naming an existing file whose name holds [ ] (a glob
    character) was expanded as a glob, matched nothing and was reported missing_path."""
    files = {"notes [2023].jsonl": (json.dumps({"text": STORY}) + "\n").encode()}
    m = _one_build(tmp_path, files, sources=["notes [2023].jsonl"]).manifest
    assert m["counts"]["documents_kept"] == 1
