"""The data stage's exchanges without Ray: partitioned runs read back by byte range, and dedup on keys alone."""

import numpy as np

from llm_platform.data import dedup, prepare
from llm_platform.data.exchange import PartitionedWriter, read_segments, segments, sum_counters


def test_runs_give_each_partition_its_rows_in_order_and_sum_counters(tmp_path):
    writer = PartitionedWriter(str(tmp_path / "runs" / "f"), flush_bytes=200)  # a run every few adds
    expected: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for i in range(40):
        p = i % 3
        writer.add(p, {"x": np.arange(i, i + 5, dtype=np.int64), "m": np.full((5, 2), i, np.uint8)},
                   {"documents": 1, "chat": {"truncated": i % 2}})
        expected[p] += list(range(i, i + 5))
    runs = writer.close()
    assert len(runs) > 3  # it flushed along the way
    for p in range(3):
        got = list(read_segments(segments(runs, p)))
        assert np.concatenate([a["x"] for a, _ in got]).tolist() == expected[p]
        assert all(a["m"].shape == (a["x"].shape[0], 2) for a, _ in got)
        meta = sum_counters([m for _, m in got])
        assert meta["documents"] == sum(1 for i in range(40) if i % 3 == p)
        assert meta["chat"]["truncated"] == sum(i % 2 for i in range(40) if i % 3 == p)
    assert segments(runs, 7) == []


def _corpus(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(400)]
    texts = [" ".join(rng.choice(words, size=100)) for _ in range(n)]
    for i in range(0, n, 7):  # near duplicates: one or two words changed, or a sentence added
        j = min(n - 1, i + 1 + int(rng.integers(0, 5)))
        changed = texts[i].split()
        changed[int(rng.integers(0, 100))] = "changed"
        if i % 2:
            changed[int(rng.integers(0, 100))] = "again"
        texts[j] = " ".join(changed) + (" the end" if i % 3 == 0 else "")
    return texts


def test_dedup_on_keys_alone_finds_what_comparing_every_band_rows_signature_finds(tmp_path):
    """The stage's dedup (band keys through the exchange, then the candidates' signatures fetched once) marks
    exactly the documents that comparing each band row's b-bit signature with its group's first (the old shuffle's
    `block_duplicates`, which carried the signature on every row) marks."""
    from llm_platform.config.data import DedupConfig

    params = prepare.KeyParams.from_config(DedupConfig())
    texts = _corpus(600, seed=1)
    ids = np.asarray([(f << 32) | line for f in range(3) for line in range(1, 201)], dtype=np.int64)
    hashes = np.asarray([dedup.text_hash(t) for t in texts], dtype=np.int64)

    # Reference: every band row with its signature, grouped in one block.
    keys, sigs = prepare.dedup_keys(ids, hashes, texts, params)
    ref_ids, _ = dedup.block_duplicates(keys["near_key"], keys["near_doc"], np.repeat(sigs, params.bands, axis=0),
                                        params.threshold)

    # The stage: three files write keys (no signatures) into 4 partitions, and their signatures apart.
    sig_runs, key_runs = [], []
    for f in range(3):
        sel = slice(200 * f, 200 * (f + 1))
        found, s = prepare.dedup_keys(ids[sel], hashes[sel], texts[sel], params)
        writer = PartitionedWriter(str(tmp_path / "keys" / f"{f}"))
        prepare._write_keys(writer, found, 4)
        key_runs += writer.close()
        assert all(name in ("exact_key", "exact_doc", "near_key", "near_doc")
                   for r in key_runs for part in r["parts"].values() for name, _, _ in part["arrays"])
        sig_writer = PartitionedWriter(str(tmp_path / "sigs" / f"{f}"))
        sig_writer.add(0, {"doc": ids[sel], "sig": s})
        sig_runs.append((f, sig_writer.close()))  # one unit per file
    pairs = [prepare.dedup_partition(segments(key_runs, p)) for p in range(4)]
    docs = np.concatenate([p["near_doc"] for p in pairs])
    firsts = np.concatenate([p["near_first"] for p in pairs])
    near, near_of = prepare.verify_pairs(docs, firsts, sig_runs, params.threshold)

    assert len(ref_ids) > 40 and len(ref_ids) < 86  # the corpus has near duplicates to find
    assert sorted(near.tolist()) == sorted(ref_ids.tolist())
    assert (near_of < near).all()
    # Exact duplicates through the same partitions.
    exact = np.concatenate([p["exact_doc"] for p in pairs])
    assert exact.shape[0] == len(hashes) - len(np.unique(hashes))
