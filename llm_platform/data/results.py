"""What the data stage's tasks return to the driver, typed: per unit of input files, the duplicates, per tokenized
unit, per shard.

Each task also leaves its result as a JSON marker under `<dataset>/_work/` so an interrupted run resumes task by
task; `to_json` / `from_json` are that seam (the marker's keys are the fields' names, `resumed` left out: a result
read back from its marker is the resumed one). Between the driver and a Ray task the results travel pickled as they
are (executor.py). The records inside (skipped records, dropped examples, run indexes) stay plain JSON-shaped dicts:
they go into the manifest or to exchange.py as they are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np


@dataclass
class FileResult:
    """One unit of input files read and cleaned (`prepare.prepare_unit`): its counts, the first skipped records and
    dropped examples, and the indexes of the dedup key and signature runs it wrote. The task counts into it as it
    reads (`prepare._Count`); after that nothing changes it (`with_file_lines` returns a new one)."""

    unit: str
    """The unit's name (`prepare.unit_name`): its first and last piece index."""
    pieces: tuple[int, int]
    """Its first and last piece index (a doc id's high half is its piece index)."""
    records: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    """Records dropped, by reason."""
    pii_replacements: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    """The unit's first skipped records (source, line, reason; `piece` until `with_file_lines` numbers them)."""
    range_lines: dict[int, int] = field(default_factory=dict)
    """Lines held by each of its pieces that is a byte range of a larger file."""
    dropped_by_file: dict[str, dict[str, int]] = field(default_factory=dict)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Per drop reason, the first dropped documents (source, line, start of the text)."""
    languages: dict[str, dict[str, int]] = field(default_factory=lambda: {"detected": {}, "kept": {}})
    key_runs: list[dict[str, Any]] = field(default_factory=list)
    sig_runs: list[dict[str, Any]] = field(default_factory=list)
    resumed: bool = False
    """Read back from the marker an interrupted earlier run left."""

    def to_json(self) -> dict[str, Any]:
        record = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "resumed"}
        return {**record, "pieces": list(self.pieces), "range_lines": {str(p): n for p, n in self.range_lines.items()}}

    @classmethod
    def from_json(cls, record: dict[str, Any], resumed: bool = True) -> FileResult:
        # Markers from before `range_lines`, `dropped_by_file`, `examples` or `languages` existed lack them.
        first, last = record["pieces"]
        return cls(
            unit=record["unit"], pieces=(int(first), int(last)), records=int(record["records"]),
            kept=int(record["kept"]), dropped=dict(record["dropped"]),
            pii_replacements=int(record["pii_replacements"]), skipped=list(record["skipped"]),
            range_lines={int(p): int(n) for p, n in (record.get("range_lines") or {}).items()},
            dropped_by_file=dict(record.get("dropped_by_file") or {}), examples=dict(record.get("examples") or {}),
            languages={"detected": {}, "kept": {}, **(record.get("languages") or {})},
            key_runs=list(record["key_runs"]), sig_runs=list(record["sig_runs"]), resumed=resumed)


@dataclass(frozen=True)
class Duplicates:
    """Duplicate doc ids with the id they duplicate and whether the match is exact (else near)."""

    doc_id: np.ndarray
    dup_of: np.ndarray
    exact: np.ndarray
    resumed: bool = False


@dataclass(frozen=True)
class EncodedUnit:
    """One cleaned unit tokenized (`encode.encode_unit`): the runs of its tokens bucketed by output shard."""

    unit: str
    runs: list[dict[str, Any]]
    """exchange.py's run indexes, partitioned by output shard."""
    mixture: dict[str, Any] | None = None
    """`data.mixture`: the unit's histogram (`mixture.to_record`)."""
    resumed: bool = False

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {"unit": self.unit, "runs": self.runs}
        if self.mixture is not None:
            record["mixture"] = self.mixture
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any], resumed: bool = True) -> EncodedUnit:
        return cls(unit=record["unit"], runs=list(record["runs"]), mixture=record.get("mixture"), resumed=resumed)


@dataclass(frozen=True)
class ShardResult:
    """One output shard written (`shards.pack_shard`): what the manifest sums per split."""

    shard: str
    """Its name, `train-00000` ..."""
    split: str
    file: str
    """Its parquet file, relative to the dataset folder (written only when it holds records)."""
    documents: int = 0
    records: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    remainder: int = 0
    skipped_prompt_too_long: int = 0
    chat: dict[str, int] = field(default_factory=dict)
    """chat and preference: truncated and skipped conversations by reason."""
    token_counts: list[int] = field(default_factory=list)
    length_hist: list[int] = field(default_factory=list)
    row_groups: list[list[int]] | None = None
    """Its parquet row groups as [rows, count] runs (None: no file, or a marker from an older run)."""
    packing: dict[str, int] | None = None
    """`data.pack_supervised`: examples, rows and tokens (`pack.pack_examples`)."""
    mixture: dict[str, list[int]] | None = None
    """`data.mixture`: per source index, the documents and tokens written."""
    resumed: bool = False

    def to_json(self) -> dict[str, Any]:
        record = asdict(replace(self, resumed=False))
        del record["resumed"]
        return {k: v for k, v in record.items() if v is not None}

    @classmethod
    def from_json(cls, record: dict[str, Any], resumed: bool = True) -> ShardResult:
        known = {f.name for f in fields(cls)} - {"resumed"}
        return cls(**{k: v for k, v in record.items() if k in known}, resumed=resumed)
