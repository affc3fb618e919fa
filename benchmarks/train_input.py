"""Training input: rows each worker reads per epoch against its share, and the time to resume late in an epoch.

    python benchmarks/train_input.py [--rows 65536] [--seq-len 512] [--files 8] [--micro-batch 8]

A tokenized split laid out as the data stage writes it (`--files` parquet shards, 256-row groups, int32 token rows of
`--seq-len`) is read by `train/reader.py` exactly as training workers read it, each rank in turn in this process
(simulated workers: the reader is plain pyarrow, what each rank reads does not depend on where it runs), with the
run's default data partitions (micro-batch x workers) and shuffling on (1,024-row windows).

- Rows read per worker over one epoch / (split rows / workers), at 1, 2, 4 and 8 workers. The scheme before this
  reader (every rank iterated the whole split and kept 1/world of each global batch) read `workers` times its
  share: its column is that count.
- Seconds to the first batch when resuming at the start of an epoch and at 90% of it (ours seeks), and what reading
  up to the 90% position costs (what resuming did before: the old loop read and discarded every earlier batch).

Last line: `ratio=<the largest rows-read / share over the worker counts>` (goal: at most 1.05; resume time flat).
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llm_platform.train.reader import RankReader, SplitFiles


def write_split(folder: Path, rows: int, seq_len: int, files: int) -> list[str]:
    """Shards like the data stage's (256-row groups; list<int32> rows)."""
    rng = np.random.default_rng(0)
    out, per = [], rows // files
    for f in range(files):
        ids = rng.integers(0, 32000, size=(per, seq_len), dtype=np.int32)
        column = pa.ListArray.from_arrays(np.arange(0, per * seq_len + 1, seq_len, dtype=np.int32), ids.reshape(-1))
        path = folder / f"part-{f:05d}.parquet"
        pq.write_table(pa.table({"input_ids": column}), path, row_group_size=256)
        out.append(str(path))
    return out


def reader(files, rank, world, m) -> RankReader:
    return RankReader(SplitFiles(files, ["input_ids"]), partitions=m * world, micro_batch_size=m, rank=rank,
                      world=world, seed=0, shuffle=True, window_rows=1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=8)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="llmp-bench-input-"))
    try:
        files = write_split(folder, args.rows, args.seq_len, args.files)
        size_mb = sum(os.path.getsize(f) for f in files) / 2**20
        print(f"split: {args.rows:,} rows x {args.seq_len} tokens in {args.files} shards ({size_mb:.0f} MB), "
              f"micro-batch {args.micro_batch}, partitions = micro-batch x workers, shuffled")
        print(f"{'workers':>8} {'share (rows)':>13} {'read per worker (max)':>22} {'ours / share':>13} "
              f"{'before / share':>15}")
        worst = 0.0
        m = args.micro_batch
        for world in (1, 2, 4, 8):
            reads = []
            for rank in range(world):
                r = reader(files, rank, world, m)
                state = {"epoch": 0, "batches_in_epoch": 0}
                for _ in itertools.islice(r.batches(state), r.batches_per_epoch()):
                    pass
                reads.append(r.files.rows_read)
            share = args.rows / world
            worst = max(worst, max(reads) / share)
            print(f"{world:>8} {share:>13,.0f} {max(reads):>22,} {max(reads) / share:>13.3f} {world:>15.3f}")

        world = 4
        r = reader(files, 0, world, m)
        per_epoch = r.batches_per_epoch()
        late = int(per_epoch * 0.9)
        rows = []
        for name, position in (("resume at the epoch's start", 0), ("resume at 90% (seek)", late)):
            r = reader(files, 0, world, m)
            t0 = time.perf_counter()
            next(r.batches({"epoch": 0, "batches_in_epoch": position}))
            rows.append((name, time.perf_counter() - t0, r.files.rows_read))
        r = reader(files, 0, world, m)
        t0 = time.perf_counter()
        for _ in itertools.islice(r.batches({"epoch": 0, "batches_in_epoch": 0}), late + 1):
            pass
        rows.append(("read up to 90% (before)", time.perf_counter() - t0, r.files.rows_read))
        print(f"\nrank 0 of {world} workers, {per_epoch} global micro-batches an epoch")
        print(f"{'to the first batch':<32} {'seconds':>9} {'rows read':>10}")
        for name, seconds, read in rows:
            print(f"{name:<32} {seconds:>9.3f} {read:>10,}")
        print(f"ratio={worst:.3f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
