"""Training input (train/reader.py): each worker reads only its share, the order is the workers' business only
through P, and a resume seeks instead of reading up to its position."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm_platform.train.reader import RankReader, SplitFiles, epoch_rows

T = 4  # tokens per row: row i holds [i, i, i, i], so a row names itself


def write_split(folder, rows_per_file=(600, 424), group_rows=64) -> list[str]:
    files, start = [], 0
    for f, n in enumerate(rows_per_file):
        ids = np.repeat(np.arange(start, start + n, dtype=np.int32)[:, None], T, axis=1)
        table = pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(ids.reshape(-1), T).cast(
            pa.list_(pa.int32()))})
        path = folder / f"part-{f:05d}.parquet"
        pq.write_table(table, path, row_group_size=group_rows)
        files.append(str(path))
        start += n
    return files


def ranks_of_an_epoch(files, *, world, m, partitions, shuffle, epoch=0, state=None):
    """{rank: [row ids in the order it got them]} over one epoch, and each rank's rows read from storage."""
    out, read = {}, {}
    for rank in range(world):
        split = SplitFiles(files, ["input_ids"])
        reader = RankReader(split, partitions=partitions, micro_batch_size=m, rank=rank, world=world, seed=7,
                            shuffle=shuffle, window_rows=256)
        st = dict(state or {"epoch": epoch, "batches_in_epoch": 0})
        n = reader.batches_per_epoch(st["epoch"]) - st["batches_in_epoch"]
        out[rank] = [int(r[0]) for b in itertools.islice(reader.batches(st), n) for r in b["input_ids"]]
        read[rank] = split.rows_read
    return out, read


def global_order(by_rank, m):
    """Interleave ranks' rows back into the global order (global micro-batch after global micro-batch)."""
    world = len(by_rank)
    batches = len(by_rank[0]) // m
    return [x for k in range(batches) for r in range(world) for x in by_rank[r][k * m:(k + 1) * m]]


@pytest.mark.parametrize("shuffle", [False, True])
def test_each_worker_reads_only_its_share_and_the_ranks_cover_the_epoch(tmp_path, shuffle):
    # Row groups of 16 rows: at least 4 per partition for 4 workers x 4 rows (the data stage writes 256-row groups;
    # fewer groups than that make blocks smaller than a group, which several workers decode).
    files = write_split(tmp_path, group_rows=16)
    for world in (1, 2, 4):
        m = 4
        by_rank, read = ranks_of_an_epoch(files, world=world, m=m, partitions=m * world, shuffle=shuffle)
        rows = [x for r in by_rank.values() for x in r]
        assert len(rows) == len(set(rows)), "no row twice in an epoch"
        # The epoch ends with its smallest partition: it drops less than a block (16 rows) per partition.
        assert len(rows) >= 1024 - 16 * m * world, (world, len(rows))
        order = RankReader(SplitFiles(files, ["input_ids"]), partitions=m * world, micro_batch_size=m, rank=0,
                           world=world, seed=7, shuffle=shuffle, window_rows=256).order(0)
        assert sum(order.part_rows) == 1024  # the partitions hold every row once
        for rank in range(world):
            own = sum(order.part_rows[rank * m:(rank + 1) * m])  # the rows of this rank's partitions
            assert read[rank] <= own and own <= 1.15 * 1024 / world, (world, rank, read, order.part_rows)


def test_the_order_does_not_depend_on_the_worker_count(tmp_path):
    files = write_split(tmp_path)
    reference = [int(r[0]) for r in epoch_rows(SplitFiles(files, ["input_ids"]), partitions=8, seed=7, epoch=0,
                                               shuffle=True, window_rows=256)["input_ids"]]
    for world, m in ((1, 8), (2, 4), (4, 2), (8, 1)):
        by_rank, _ = ranks_of_an_epoch(files, world=world, m=m, partitions=8, shuffle=True)
        assert global_order(by_rank, m) == reference[:len(global_order(by_rank, m))], (world, m)


def test_shuffling_is_seeded_per_epoch(tmp_path):
    files = write_split(tmp_path)
    orders = [epoch_rows(SplitFiles(files, ["input_ids"]), partitions=4, seed=7, epoch=e, shuffle=True,
                         window_rows=256)["input_ids"][:, 0].tolist() for e in (0, 1, 0)]
    assert orders[0] == orders[2] and orders[0] != orders[1]
    for order in orders:  # each epoch: distinct rows, all but less than a row group (64) per partition (4)
        assert len(set(order)) == len(order) >= 1024 - 4 * 64 and set(order) <= set(range(1024))
    plain = epoch_rows(SplitFiles(files, ["input_ids"]), partitions=1, seed=7, epoch=0, shuffle=False)
    assert plain["input_ids"][:, 0].tolist() == list(range(1024))  # one partition, no shuffle: the file order


def test_a_resume_late_in_the_epoch_reads_only_what_follows(tmp_path):
    files = write_split(tmp_path)
    world, m = 2, 4
    full, full_read = ranks_of_an_epoch(files, world=world, m=m, partitions=8, shuffle=True)
    per_epoch = len(full[0]) // m
    at = int(per_epoch * 0.9)
    resumed, resumed_read = ranks_of_an_epoch(files, world=world, m=m, partitions=8, shuffle=True,
                                              state={"epoch": 0, "batches_in_epoch": at})
    for rank in range(world):
        assert resumed[rank] == full[rank][at * m:]  # the same samples, from the saved position on
        # Only the windows from the position on are read: about 10% of the share, plus a window per partition.
        window = 256 // 8
        assert resumed_read[rank] <= 0.1 * full_read[rank] + m * (window + 64), (resumed_read, full_read)


def test_a_changed_worker_count_resumes_at_the_same_sample(tmp_path):
    files = write_split(tmp_path)
    # 2 workers x 4 rows ran 10 global micro-batches (80 positions); 4 workers x 2 rows continue (P stays 8).
    first, _ = ranks_of_an_epoch(files, world=2, m=4, partitions=8, shuffle=True)
    done = global_order(first, 4)[:80]
    then, _ = ranks_of_an_epoch(files, world=4, m=2, partitions=8, shuffle=True,
                                state={"epoch": 0, "batches_in_epoch": 80 // (4 * 2)})
    reference = global_order(first, 4)
    assert done + global_order(then, 2) == reference[:80 + len(global_order(then, 2))]


def test_too_little_data_for_one_round_is_a_clear_error(tmp_path):
    files = write_split(tmp_path, rows_per_file=(6,), group_rows=6)
    reader = RankReader(SplitFiles(files, ["input_ids"]), partitions=8, micro_batch_size=4, rank=0, world=2, seed=0,
                        shuffle=False)
    with pytest.raises(RuntimeError, match="fewer than micro_batch_size \\* num_workers = 8 rows"):
        next(reader.batches({"epoch": 0, "batches_in_epoch": 0}))


def test_row_groups_from_the_manifest_spare_every_footer_read(tmp_path, monkeypatch):
    """Given each file's row groups (the manifest's [rows, count] runs), a worker plans its share without opening a
    single file; without them (an older manifest) or with a list that does not match the files, it reads footers."""
    from llm_platform import storage

    files = write_split(tmp_path, rows_per_file=(600, 424), group_rows=64)
    from_footers = SplitFiles(files, ["input_ids"]).group_rows
    runs = [[[64, 9], [24, 1]], [[64, 6], [40, 1]]]
    assert [[n for n, c in r for _ in range(c)] for r in runs] == from_footers
    opened: list[str] = []
    real = storage.pyarrow_filesystem
    monkeypatch.setattr(storage, "pyarrow_filesystem", lambda uri: opened.append(uri) or real(uri))
    split = SplitFiles(files, ["input_ids"], row_groups=runs)
    assert split.group_rows == from_footers and opened == []
    assert split.read(split.blocks(2)[0])["input_ids"].shape == (64, T)  # reads still work
    opened.clear()
    assert SplitFiles(files, ["input_ids"], row_groups=runs[:1]).group_rows == from_footers and len(opened) == 2
