"""Dedup (exact, MinHash), splitting and packing, without Ray."""

import numpy as np
import pytest

from llm_platform.data import dedup, pack, sample


def test_text_hash_ignores_case_and_spacing():
    assert dedup.text_hash("The  Dog\nran") == dedup.text_hash("the dog ran")
    assert dedup.text_hash("the dog ran") != dedup.text_hash("the cat ran")


def test_minhash_estimates_jaccard():
    a, b = dedup.permutations(256, seed=1)
    base = " ".join(f"word{i}" for i in range(200))
    near = base.replace("word100", "other")  # 5 of 196 shingles change
    far = " ".join(f"term{i}" for i in range(200))
    s0, s1, s2 = (dedup.signature(t, a, b, 5) for t in (base, near, far))
    assert (s0 == s1).mean() > 0.9
    assert (s0 == s2).mean() < 0.05
    assert np.array_equal(s0, dedup.signature(base, a, b, 5))  # deterministic


def test_batched_signatures_match_one_at_a_time_in_any_grouping():
    a, b = dedup.permutations(128, seed=3)
    texts = [d["text"] for d in sample.generate(300, seed=2)]
    texts += ["", "   ", "one", "two words here", "Ünïcode café 日本語 and some more words", "x " * 5000]
    together = dedup.signatures(texts, a, b, 5)
    assert together.shape == (len(texts), 128) and together.dtype == np.uint32
    assert np.array_equal(together, np.stack([dedup.signature(t, a, b, 5) for t in texts]))
    assert np.array_equal(together, dedup.signatures(texts, a, b, 5, chunk_shingles=41))  # groups split mid-text
    assert np.array_equal(together[300], together[301])  # no words: the same single empty shingle
    assert not np.array_equal(together[302], together[303])
    keys = dedup.band_keys(together, 14, 9)
    assert keys.shape == (len(texts), 14) and keys.dtype == np.int64
    assert np.array_equal(keys[7], dedup.band_keys(together[7], 14, 9))
    rng = np.random.default_rng(4)
    unrelated = [" ".join(f"w{i}" for i in rng.integers(0, 10**9, size=40)) for _ in range(300)]
    assert len(np.unique(dedup.band_keys(dedup.signatures(unrelated, a, b, 5), 14, 9))) == 300 * 14


def test_minhash_estimate_is_unbiased_for_known_overlap():
    rng = np.random.default_rng(0)
    a, b = dedup.permutations(128, seed=0)
    errors = []
    for _ in range(100):
        base = [f"w{rng.integers(1 << 40)}" for _ in range(150)]
        other = list(base)
        for i in rng.choice(150, int(rng.integers(0, 30)), replace=False):
            other[i] = f"z{rng.integers(1 << 40)}"
        sa = {tuple(base[i:i + 5]) for i in range(146)}
        sb = {tuple(other[i:i + 5]) for i in range(146)}
        s0, s1 = dedup.signatures([" ".join(base), " ".join(other)], a, b, 5)
        errors.append((s0 == s1).mean() - len(sa & sb) / len(sa | sb))
    assert abs(np.mean(errors)) < 0.02 and np.std(errors) < 0.06  # 1/sqrt(128) = 0.088 bounds the spread


def test_block_duplicates_unbiases_bbit_signatures():
    rng = np.random.default_rng(1)
    first = rng.integers(0, 1 << 32, size=256, dtype=np.uint64).astype(np.uint32)
    similar = first.copy()
    similar[:64] = rng.integers(0, 1 << 32, size=64, dtype=np.uint64).astype(np.uint32)  # true estimate 0.75
    sigs = dedup.bbit(np.stack([first, similar]))
    assert sigs.dtype == np.uint8
    keys, ids = np.array([5, 5]), np.array([1, 2])
    # Raw 8-bit matches read slightly high (0.75 + 0.25/256 expected); corrected, the pair stays under 0.76.
    assert dedup.block_duplicates(keys, ids, sigs, threshold=0.76)[0].size == 0
    assert dedup.block_duplicates(keys, ids, sigs, threshold=0.74)[0].tolist() == [2]


def test_lsh_params_fit_num_perm_and_favour_recall():
    bands, rows = dedup.lsh_params(0.8, 128)
    assert bands * rows <= 128 and bands > 1 and rows > 1
    candidate = lambda s: 1 - (1 - s ** rows) ** bands  # noqa: E731
    assert candidate(0.83) > 0.9 and candidate(0.5) < 0.05


def test_block_duplicates_exact_keeps_smallest_id():
    keys = np.array([7, 3, 7, 7, 3, 9])
    ids = np.array([10, 5, 2, 30, 6, 1])
    dup, of = dedup.block_duplicates(keys, ids)
    assert dict(zip(dup.tolist(), of.tolist())) == {10: 2, 30: 2, 6: 5}


def test_block_duplicates_near_checks_similarity():
    keys = np.array([1, 1, 1])
    ids = np.array([1, 2, 3])
    sigs = np.array([[1, 2, 3, 4], [1, 2, 3, 9], [5, 6, 7, 8]], dtype=np.uint32)
    dup, of = dedup.block_duplicates(keys, ids, sigs, threshold=0.7)
    assert dup.tolist() == [2] and of.tolist() == [1]


def test_split_is_deterministic_and_near_fraction():
    hashes = [dedup.text_hash(f"doc {i}") for i in range(5000)]
    splits = [dedup.split_of(h, 0.1) for h in hashes]
    assert splits == [dedup.split_of(h, 0.1) for h in hashes]
    assert 0.08 < splits.count("val") / len(splits) < 0.12


def test_packing_conserves_tokens_and_carries_leftovers():
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 100, size=rng.integers(1, 40)).tolist() for _ in range(57)]
    packer = pack.Packer(seq_len=16, eos_id=0)
    blocks = [packer.add(docs[i:i + 5]) for i in range(0, len(docs), 5)]
    total_blocks = sum(b.shape[0] for b in blocks)
    tokens_in = sum(len(d) + 1 for d in docs)
    assert packer.tokens_in == tokens_in
    assert tokens_in == total_blocks * 16 + packer.remainder and packer.remainder < 16
    stream = np.concatenate([b.reshape(-1) for b in blocks])
    expected = np.concatenate([np.array(d + [0]) for d in docs])[: stream.shape[0]]
    assert np.array_equal(stream, expected)  # order kept, nothing dropped between batches


def test_supervised_masks_prompt_and_padding():
    rec = pack.supervised([5, 6, 7], [8, 9], seq_len=8, eos_id=0, pad_id=1)
    assert rec["input_ids"].tolist() == [5, 6, 7, 8, 9, 0, 1, 1]
    assert rec["labels"].tolist() == [-100, -100, -100, 8, 9, 0, -100, -100]
    assert rec["attention_mask"].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    assert pack.supervised(list(range(10)), [1], seq_len=8, eos_id=0, pad_id=1) == "prompt_too_long"


def test_seq2seq_record_shapes():
    rec = pack.seq2seq([4, 5], [6, 7, 8], seq_len=4, target_len=3, eos_id=0, pad_id=1)
    assert rec["input_ids"].tolist() == [4, 5, 0, 1]
    assert rec["labels"].tolist() == [6, 7, 0]


def test_sample_corpus_is_deterministic_and_salted():
    a, b = sample.generate(500, seed=3), sample.generate(500, seed=3)
    assert a == b and a != sample.generate(500, seed=4)
    texts = [d["text"] for d in a]
    assert len(set(texts)) < len(texts)  # exact duplicates present
    assert any("@example.com" in t for t in texts)


@pytest.mark.parametrize("n", [0, 1])
def test_empty_blocks(n):
    packer = pack.Packer(seq_len=4, eos_id=0)
    assert packer.add([[1, 2]] * n).shape == (0, 4)


def test_packed_shard_counts_every_documents_tokens_and_conserves_them(tmp_path):
    """One pretraining shard through the stage's own calls on local storage (a cleaned unit -> `encode_unit` ->
    `pack_shard`, what the Ray tasks run): the token frequencies it reports are the documents' own tokens (no EOS
    it added), and the parquet blocks hold them all, in document order."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from llm_platform import storage
    from llm_platform.config.tokenizer import TokenizerConfig
    from llm_platform.data import encode, shards
    from llm_platform.data import tokenizer as tokenizers
    from llm_platform.data.exchange import segments

    texts = [d["text"] for d in sample.generate(120, seed=5)] + ["", "<|endoftext|> inside a document"]
    tok = tokenizers.train_bpe(texts, TokenizerConfig(vocab_size=300))
    tok_uri = str(tmp_path / "tok")
    tokenizers.save(tok, tok_uri)
    record = tokenizers.describe(tok, "x")
    work = tmp_path / "work"
    (work / "clean").mkdir(parents=True)
    n = len(texts)
    # Two row groups, so the documents reach the packer across batches (leftovers carried over).
    pq.write_table(pa.table({"doc_id": np.arange(n, dtype=np.int64), "text_hash": np.zeros(n, np.int64),
                             "text": texts}), work / "clean" / "000000-000000.parquet", row_group_size=50)
    spec = shards.ShardSpec(kind="pretrain", seq_len=16, target_len=0, val_fraction=0.0, counts={"train": 1},
                            tokenizer_uri=tok_uri, eos=record["eos_token_id"], pad=record["pad_token_id"],
                            vocab=record["vocab_size"], batch=7, chat_overflow="truncate", work=str(work),
                            out=str(tmp_path / "out"))
    encoded = encode.encode_unit("000000-000000", np.empty(0, np.int64), spec)
    stat = shards.pack_shard("train-00000", segments(encoded.runs, 0), spec)

    ids = [tok(t, add_special_tokens=False).input_ids for t in texts]  # doc_id order
    expected = np.bincount(np.concatenate([np.asarray(x, dtype=np.int64) for x in ids]), minlength=record["vocab_size"])
    assert stat.token_counts == expected.tolist()
    assert stat.documents == len(texts) and stat.tokens_in == sum(map(len, ids)) + len(texts)
    table = pq.read_table(io.BytesIO(storage.read_bytes(str(tmp_path / "out" / "train" / "part-00000.parquet"))))
    column = table.schema.field("input_ids").type
    assert column.value_type == "int32" and str(column).startswith("list<")  # the same schema as before
    stream = [t for block in table["input_ids"].to_pylist() for t in block]
    assert len(stream) == stat.records * 16 == stat.tokens_in - stat.remainder
    flat = [t for x in ids for t in x + [record["eos_token_id"]]]
    assert stream == flat[:len(stream)]  # EOS after each document, in order, leftovers carried to the end
    shard_bytes = storage.read_bytes(str(tmp_path / "out" / "train" / "part-00000.parquet"))
    meta = pq.ParquetFile(io.BytesIO(shard_bytes)).metadata
    written = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    assert [n for n, count in (stat.row_groups or []) for _ in range(count)] == written  # what the manifest will carry
