"""Training input: each worker reads only its share of an epoch, and a resumed run seeks to its position.

The order of an epoch is defined once, independently of the number of workers and the micro-batch size, by
`partitions` (P, fixed when a run starts and kept in its checkpoints) and the seed:

- The split's rows are cut into blocks (its parquet row groups; smaller row ranges when there are too few groups to
  give every partition several) and, each epoch, the blocks are shuffled (seeded by seed and epoch; file order
  when shuffling is off) and dealt, each to the partition holding the fewest rows so far, into P partitions.
  Inside a partition, rows are shuffled within windows of blocks (about `shuffle_buffer_rows / P` rows).
- Global position i of the epoch is row i // P of partition i % P. A global micro-batch is `micro_batch_size *
  num_workers` consecutive positions and rank r takes its r-th `micro_batch_size` of them, as before.

With P equal to the global micro-batch (the default at a run's start), rank r always takes partitions
[r * m, (r + 1) * m): it reads those partitions' blocks and nothing else, 1/world of the data. The data position is
the number of positions consumed in the epoch, so a run resumed with another worker count or micro-batch size
continues at the same sample (its ranks then share partitions, reading more than their share, but the order is the
same). Resuming seeks: a partition's cursor skips whole windows by their row counts (from parquet footers), reading
only the window the position falls in.

Plain pyarrow reads (local or S3 through `storage.pyarrow_filesystem`, with its retries); no Ray Data in the loop.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Iterator, Mapping

import numpy as np

from llm_platform import storage
from llm_platform.data.pack import PACKED_COLUMNS


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where a run is in its training data, in units that do not depend on the worker count. Every checkpoint keeps
    it (train/checkpoint.py), so a resumed run continues at the exact sample."""

    epoch: int = 0
    """Epochs finished."""
    batches_in_epoch: int = 0
    """Global micro-batches of `rows_per_batch` rows consumed in `epoch` (its positions consumed / rows_per_batch)."""
    rows_per_batch: int = 1
    """Rows of one global micro-batch (micro_batch_size x num_workers) of the run that took this position."""
    data_partitions: int = 1
    """P, the partitions of the epoch order (fixed when a run starts; see the module docstring)."""

    @property
    def rows_in_epoch(self) -> int:
        """Positions of the epoch consumed."""
        return self.batches_in_epoch * self.rows_per_batch

    def rebased(self, rows_per_batch: int) -> DataPosition:
        """The same position in global micro-batches of `rows_per_batch` rows (another worker count or micro-batch
        size); a ValueError when it falls inside one."""
        if self.rows_in_epoch % rows_per_batch:
            raise ValueError(f"the checkpoint stopped after {self.rows_in_epoch} rows of its epoch, which is not a "
                             f"whole number of train.micro_batch_size * scaling.num_workers = {rows_per_batch} rows: "
                             f"resume with a micro-batch size and worker count whose product divides "
                             f"{self.rows_in_epoch}")
        return dataclasses.replace(self, batches_in_epoch=self.rows_in_epoch // rows_per_batch,
                                   rows_per_batch=rows_per_batch)


@dataclasses.dataclass(frozen=True)
class Block:
    file: int
    row_group: int
    start: int  # first row inside the row group
    rows: int


class SplitFiles:
    """The parquet files of one split: their row groups and a small cache of decoded groups.

    The row groups come from the manifest (`row_groups`: each file's [rows, count] runs, what the data stage wrote)
    when given, else from each file's footer: one read per file per worker before the first batch, which for
    thousands of shards on S3 and tens of workers was the start-up."""

    def __init__(self, files: list[str], columns: list[str], cache_bytes: int = 256 * 2**20,
                 row_groups: list[list[list[int]]] | None = None):
        import pyarrow.parquet as pq

        self.files, self.columns = list(files), columns
        self.group_rows: list[list[int]] = []
        if row_groups is not None and len(row_groups) == len(self.files):
            self.group_rows = [[size for size, count in runs for _ in range(count)] for runs in row_groups]
        for uri in self.files[len(self.group_rows):]:
            fs, path = storage.pyarrow_filesystem(uri)
            meta = pq.ParquetFile(fs.open_input_file(path)).metadata
            self.group_rows.append([meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._cache_bytes, self._cached = cache_bytes, 0
        self.rows_read = 0  # rows decoded from storage (a cached group counts once)

    @property
    def num_rows(self) -> int:
        return sum(sum(g) for g in self.group_rows)

    def blocks(self, partitions: int) -> list[Block]:
        """Whole row groups where there are enough of them to deal every partition several (at least 4 each): a
        worker then reads exactly its own groups. Else (small data) row ranges of about 1/8 of a partition, which
        several workers may decode from one group (the group cache keeps that to once each)."""
        groups = [(f, g, n) for f, sizes in enumerate(self.group_rows) for g, n in enumerate(sizes)]
        if len(groups) >= 4 * partitions:
            return [Block(f, g, 0, n) for f, g, n in groups]
        size = max(1, self.num_rows // (8 * partitions))
        return [Block(f, g, s, min(size, n - s)) for f, g, n in groups for s in range(0, n, size)]

    def read(self, block: Block) -> dict[str, np.ndarray]:
        """The block's rows as {column: (rows, T) int64} (`pack.PACKED_COLUMNS` only where the files have them)."""
        key = (block.file, block.row_group)
        table = self._cache.get(key)
        if table is None:
            import pyarrow.parquet as pq

            fs, path = storage.pyarrow_filesystem(self.files[block.file])
            with fs.open_input_file(path) as f:
                parquet = pq.ParquetFile(f)
                names = set(parquet.schema_arrow.names)
                # A packed supervised dataset's own columns are read where they exist (a padded one has none);
                # any other missing column is an error pyarrow names.
                wanted = [c for c in self.columns if c in names or c not in PACKED_COLUMNS]
                group = parquet.read_row_group(block.row_group, columns=wanted)
            table = {c: _stack(group.column(c)) for c in wanted}
            self.rows_read += group.num_rows
            self._cache[key] = table
            self._cached += sum(v.nbytes for v in table.values())
            while len(self._cache) > 1 and self._cached > self._cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached -= sum(v.nbytes for v in old.values())
        else:
            self._cache.move_to_end(key)
        return {c: v[block.start:block.start + block.rows] for c, v in table.items()}


def _stack(column) -> np.ndarray:
    """A parquet list column of equal-length rows as a (rows, T) int64 array."""
    import pyarrow as pa

    chunked = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = chunked.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(chunked), -1).astype(np.int64)


class EpochOrder:
    """The deterministic order of one epoch: partitions of blocks, rows shuffled within windows."""

    def __init__(self, blocks: list[Block], partitions: int, seed: int, epoch: int, shuffle: bool,
                 window_blocks: int):
        self.partitions, self.window_blocks = partitions, max(1, window_blocks)
        order = list(range(len(blocks)))
        if shuffle:
            order = np.random.default_rng([seed, epoch]).permutation(len(blocks)).tolist()
        # Dealt to the partition holding the fewest rows so far (the lowest index on a tie): partitions stay within
        # a block of each other, so the epoch, which ends with its smallest partition, drops little.
        self.parts: list[list[Block]] = [[] for _ in range(partitions)]
        filled = [0] * partitions
        for i in order:
            p = min(range(partitions), key=lambda q: (filled[q], q))
            self.parts[p].append(blocks[i])
            filled[p] += blocks[i].rows
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self.part_rows = [sum(b.rows for b in part) for part in self.parts]
        # Positions are taken round-robin over partitions: the epoch ends when the smallest one does.
        self.positions = partitions * min(self.part_rows) if self.part_rows else 0

    def windows(self, p: int) -> list[list[Block]]:
        part = self.parts[p]
        return [part[i:i + self.window_blocks] for i in range(0, len(part), self.window_blocks)]

    def window_permutation(self, p: int, w: int, rows: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(rows)
        return np.random.default_rng([self.seed, self.epoch, p, w]).permutation(rows)


class PartitionCursor:
    """Reads one partition's rows in order, a window at a time; `seek` skips whole windows unread."""

    def __init__(self, files: SplitFiles, order: EpochOrder, p: int):
        self.files, self.order, self.p = files, order, p
        self.windows = order.windows(p)
        self.starts = np.cumsum([0] + [sum(b.rows for b in w) for w in self.windows])
        self.w, self.pos = -1, 0
        self.rows: dict[str, np.ndarray] | None = None

    def take(self, local: int) -> dict[str, np.ndarray]:
        """Row `local` of the partition (a forward-moving index; earlier windows are not kept)."""
        w = int(np.searchsorted(self.starts, local, side="right") - 1)
        if w != self.w:
            parts = [self.files.read(b) for b in self.windows[w]]
            rows = {c: np.concatenate([x[c] for x in parts]) for c in parts[0]}
            perm = self.order.window_permutation(self.p, w, len(next(iter(rows.values()))))
            self.rows, self.w = {c: v[perm] for c, v in rows.items()}, w
        assert self.rows is not None  # read above: w >= 0 never equals the initial -1
        i = local - int(self.starts[w])
        return {c: v[i] for c, v in self.rows.items()}


class RankReader:
    """This rank's micro-batches, epoch after epoch, from a data position on.

    Args:
        files: the train (or val) split's files.
        partitions: P (see the module docstring); fixed for a run, kept in its checkpoints.
        micro_batch_size, rank, world: this worker's slice of each global micro-batch.
        seed, shuffle, window_rows: the order (shuffle off keeps blocks in file order and rows within them).
    """

    def __init__(self, files: SplitFiles, *, partitions: int, micro_batch_size: int, rank: int, world: int,
                 seed: int, shuffle: bool, window_rows: int = 1024):
        self.files, self.partitions = files, partitions
        self.m, self.rank, self.world = micro_batch_size, rank, world
        self.seed, self.shuffle = seed, shuffle
        self.blocks = files.blocks(partitions)
        block_rows = max(1, files.num_rows // max(1, len(self.blocks)))
        self.window_blocks = max(1, window_rows // max(1, partitions) // block_rows) if shuffle else 1
        self.position = DataPosition(rows_per_batch=micro_batch_size * world, data_partitions=partitions)

    def order(self, epoch: int) -> EpochOrder:
        return EpochOrder(self.blocks, self.partitions, self.seed, epoch, self.shuffle, self.window_blocks)

    def batches_per_epoch(self, epoch: int = 0) -> int:
        return self.order(epoch).positions // (self.m * self.world)

    def batches(self, start: DataPosition | Mapping[str, int]) -> Iterator[dict[str, np.ndarray]]:
        """Forever: this rank's rows of each global micro-batch, from `start`'s epoch and position on.

        `self.position` is the position after the last micro-batch yielded: what a checkpoint saves.
        """
        g = self.m * self.world
        if isinstance(start, Mapping):  # {"epoch", "batches_in_epoch"} in this reader's global micro-batches
            start = DataPosition(int(start["epoch"]), int(start["batches_in_epoch"]), g, self.partitions)
        if start.rows_per_batch != g:
            raise ValueError(f"a position in batches of {start.rows_per_batch} rows for a reader of {g}: rebase it")
        self.position = dataclasses.replace(start, data_partitions=self.partitions)
        while True:
            epoch = self.position.epoch
            order = self.order(epoch)
            per_epoch = order.positions // g
            if per_epoch == 0:
                raise RuntimeError(f"the train split has fewer than micro_batch_size * num_workers = {g} rows per "
                                   f"round of its {self.partitions} data partitions")
            cursors: dict[int, PartitionCursor] = {}
            for batch in range(self.position.batches_in_epoch, per_epoch):
                first = batch * g + self.rank * self.m
                rows = []
                for pos in range(first, first + self.m):
                    p = pos % self.partitions
                    if p not in cursors:
                        cursors[p] = PartitionCursor(self.files, order, p)
                    rows.append(cursors[p].take(pos // self.partitions))
                self.position = dataclasses.replace(self.position, batches_in_epoch=batch + 1)
                yield {c: np.stack([r[c] for r in rows]) for c in rows[0]}
            self.position = dataclasses.replace(self.position, epoch=epoch + 1, batches_in_epoch=0)


def epoch_rows(files: SplitFiles, *, partitions: int, seed: int, epoch: int, shuffle: bool,
               window_rows: int = 1024) -> dict[str, np.ndarray]:
    """Every row of an epoch in global order (what a single-process reference loop iterates; small data only)."""
    reader = RankReader(files, partitions=partitions, micro_batch_size=1, rank=0, world=1, seed=seed,
                        shuffle=shuffle, window_rows=window_rows)
    start = DataPosition(epoch=epoch, rows_per_batch=1, data_partitions=partitions)
    rows = list(itertools.islice(reader.batches(start), reader.batches_per_epoch(epoch)))
    return {c: np.concatenate([r[c] for r in rows]) for c in rows[0]}
