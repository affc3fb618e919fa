"""A shuffle through storage: map tasks write rows bucketed by partition, reduce tasks read one partition each.

The data stage moves two things between tasks: the dedup keys (every key to the one task that owns its partition)
and the tokenized documents (every document to the task that writes its output shard). Ray Data's hash shuffle did
both before, passing every row through the object store and its sort; here a map task keeps numpy arrays per
partition, and when they pass `flush_bytes` (or at the end) writes them as one *run*: a plain binary file with the
partitions laid end to end. The run's index (partition -> byte range, array dtypes and shapes, small counters) goes
back to the driver in the task's result, and a reduce task reads only its byte range of each run (a ranged GET on
S3). Nothing is pickled and nothing is sorted: a reduce task sees the runs in the order it is given them, which is
how the stage keeps records in document order without sorting them.

    run file:   [partition 0: array a, array b, ...][partition 3: ...]...    (raw little-endian bytes)
    run index:  {"uri": ..., "parts": {"3": {"offset": o, "nbytes": n, "arrays": [[name, dtype, shape], ...],
                                              "meta": {...}}}}
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llm_platform import storage

FLUSH_BYTES = 64 << 20  # per map task: the most it holds before writing a run


@dataclass
class PartitionedWriter:
    """Collects arrays per partition and writes them as runs `<prefix>-<n>.bin` (see the module docstring).

    Every `add` for a partition must give the same array names; arrays are concatenated along their first axis.
    `meta` counters (ints, or dicts of ints) are summed per partition into the run index.
    """

    prefix: str
    flush_bytes: int = FLUSH_BYTES
    runs: list[dict[str, Any]] = field(default_factory=list)
    _parts: dict[int, dict[str, list[np.ndarray]]] = field(default_factory=dict)
    _meta: dict[int, dict[str, Any]] = field(default_factory=dict)
    _held: int = 0

    def add(self, partition: int, arrays: dict[str, np.ndarray], meta: dict[str, Any] | None = None) -> None:
        held = self._parts.setdefault(int(partition), {})
        for name, array in arrays.items():
            held.setdefault(name, []).append(np.ascontiguousarray(array))
            self._held += array.nbytes
        if meta:
            _add_counters(self._meta.setdefault(int(partition), {}), meta)
        if self._held >= self.flush_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._parts:
            return
        chunks: list[bytes] = []
        index: dict[str, Any] = {}
        offset = 0
        for partition in sorted(self._parts):
            arrays = {k: np.concatenate(v) for k, v in self._parts[partition].items()}
            spec = [[k, a.dtype.str, list(a.shape)] for k, a in arrays.items()]
            nbytes = sum(a.nbytes for a in arrays.values())
            index[str(partition)] = {"offset": offset, "nbytes": nbytes, "arrays": spec,
                                     "meta": self._meta.get(partition, {})}
            chunks += [a.tobytes() for a in arrays.values()]
            offset += nbytes
        uri = f"{self.prefix}-{len(self.runs):04d}.bin"
        storage.write_bytes(uri, b"".join(chunks))
        self.runs.append({"uri": uri, "parts": index})
        self._parts, self._meta, self._held = {}, {}, 0

    def close(self) -> list[dict[str, Any]]:
        """Write what is held; the index of every run written, in order."""
        self.flush()
        return self.runs


def _add_counters(into: dict[str, Any], more: dict[str, Any]) -> None:
    for key, value in more.items():
        if isinstance(value, dict):
            _add_counters(into.setdefault(key, {}), value)
        else:
            into[key] = into.get(key, 0) + value


def segments(runs: list[dict[str, Any]], partition: int) -> list[dict[str, Any]]:
    """What a reduce task for `partition` needs of the runs' indexes: its segments, in run order."""
    return [{"uri": r["uri"], **r["parts"][str(partition)]} for r in runs if str(partition) in r["parts"]]


def read_segments(found: list[dict[str, Any]]) -> Iterator[tuple[dict[str, np.ndarray], dict[str, Any]]]:
    """(arrays, meta) of each segment, in the order given; reads only the segment's bytes of each run."""
    for seg in found:
        fs, path = storage.filesystem(seg["uri"])
        raw = fs.cat_file(path, start=seg["offset"], end=seg["offset"] + seg["nbytes"]) if seg["nbytes"] else b""
        arrays, at = {}, 0
        for name, dtype, shape in seg["arrays"]:
            count = int(np.prod(shape)) if shape else 1
            dt = np.dtype(dtype)
            arrays[name] = np.frombuffer(raw, dtype=dt, count=count, offset=at).reshape(shape)
            at += count * dt.itemsize
        yield arrays, seg["meta"]


def read_partition(found: list[dict[str, Any]]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A reduce task's whole partition: each array name's segments concatenated in the order given, and the
    segments' counters summed."""
    parts: dict[str, list[np.ndarray]] = {}
    metas = []
    for arrays, meta in read_segments(found):
        metas.append(meta)
        for name, array in arrays.items():
            parts.setdefault(name, []).append(array)
    return {name: np.concatenate(arrays) for name, arrays in parts.items()}, sum_counters(metas)


def sum_counters(metas: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for meta in metas:
        _add_counters(out, meta)
    return out
